# A sidecar / DaemonSet image. It needs host networking to listen on the node's
# loopback, and the k3s data directory mounted read-only for the k3s preset:
#   docker run --network host -v /var/lib/rancher/k3s:/var/lib/rancher/k3s:ro \
#     -v /var/lib/lbproxy:/var/lib/lbproxy lbproxy run --k3s
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY lbproxy ./lbproxy
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 65532 --no-create-home lbproxy \
 && mkdir -p /var/lib/lbproxy && chown lbproxy /var/lib/lbproxy
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
# The k3s preset reads root-only keys under /var/lib/rancher/k3s: run that with --user 0.
USER lbproxy
EXPOSE 6445 6446
STOPSIGNAL SIGTERM
ENTRYPOINT ["lbproxy"]
CMD ["run"]
