"""``python -m lbproxy``: the same as the ``lbproxy`` console script."""

from lbproxy.cli import entry

entry()
