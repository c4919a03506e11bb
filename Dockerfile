# simple-mesh: one file on a distroless Python 3.11 (Debian 12) image. Nothing is installed: simplemesh.py uses
# the standard library only. The image runs as the distroless "nonroot" user (65532) and needs no writable path.
#
#   docker build -t simplemesh:0.1.0 .
#   docker run --rm -p 9090:9090 -e HOST=a simplemesh:0.1.0
#
# Multi-arch: the base image is published for linux/amd64 and linux/arm64, and this build only copies a file
# (no RUN step), so cross-building needs no emulation:
#   docker buildx build --platform linux/amd64,linux/arm64 -t REGISTRY/simplemesh:0.1.0 --push .
FROM gcr.io/distroless/python3-debian12:nonroot

# Unbuffered: access-log lines reach `kubectl logs` at once. No bytecode: the root filesystem is read-only.
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /app
COPY simplemesh.py /app/simplemesh.py
USER 65532:65532
EXPOSE 9090
# -I -S: isolated, no site-packages; the module needs neither. The command is `serve` unless args say otherwise
# (the load generator Deployment runs `load URL ...`).
ENTRYPOINT ["/usr/bin/python3", "-I", "-S", "/app/simplemesh.py"]
CMD ["serve"]
