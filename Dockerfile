# One small image per binary, with no base image to pull: the binary is linked
# statically on the host (`task build`) and copied into an empty filesystem.
#   docker build --build-arg BIN=server -t lb-sandbox/server .
# For machines with registry access, docker/Dockerfile.build compiles inside Docker.
FROM scratch
ARG BIN
COPY --chown=65532:65532 dist/${BIN} /app
USER 65532:65532
ENTRYPOINT ["/app"]
