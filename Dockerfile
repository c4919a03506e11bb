# simple-mesh: one file on a distroless Python 3.13 (Debian 13) image. Nothing is installed: simplemesh.py uses
# the standard library only. The image runs as the distroless "nonroot" user (65532) and needs no writable path.
#
#   docker build -t simplemesh:0.1.0 .
#   docker run --rm -p 9090:9090 -e HOST=a simplemesh:0.1.0
#
# Multi-arch: the base image is published for linux/amd64 and linux/arm64, and the only RUN step compiles
# bytecode on the build machine's own platform, so cross-building needs no emulation:
#   docker buildx build --platform linux/amd64,linux/arm64 -t REGISTRY/simplemesh:0.1.0 --push .
# Publishing: pin both bases by digest (FROM image:tag@sha256:...), as the README's "The image" says.

# Bytecode, compiled once here rather than at every start of every pod (the root filesystem is read-only, so a
# pod could never cache it): about 55 ms of start-up. It must come from the same Python minor version as the
# final image's, or that Python ignores it (the file is simplemesh.cpython-313.pyc): python3-debian13 is 3.13.
# Bytecode does not depend on the CPU, so this stage runs on the build machine's platform. Nothing is installed.
FROM --platform=$BUILDPLATFORM python:3.13-slim-trixie AS bytecode
COPY simplemesh.py /app/simplemesh.py
RUN ["/usr/local/bin/python3", "-m", "compileall", "-q", "--invalidation-mode", "unchecked-hash", "/app"]

FROM gcr.io/distroless/python3-debian13:nonroot
WORKDIR /app
COPY simplemesh.py /app/simplemesh.py
COPY --from=bytecode /app/__pycache__ /app/__pycache__
USER 65532:65532
EXPOSE 9090
# -E -s -S: no PYTHON* variables, no user or site packages; the module needs none. `-m simplemesh` (from WORKDIR)
# rather than the script path: CPython keeps a script's whole syntax tree for the life of the process, about 8 MB
# of every node's memory, but frees it at once for a module. The command is `serve` unless args say otherwise
# (the load generator Deployment runs `load URL ...`).
ENTRYPOINT ["/usr/bin/python3", "-E", "-s", "-S", "-m", "simplemesh"]
CMD ["serve"]
