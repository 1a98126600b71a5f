#!/bin/sh
# After the pull: the image must be built for the server's platform, or the deploy stops here, saying what to do
# (instead of every replica failing with `exec format error`). Settings first (infra/host/setup.py): IMAGE,
# PLATFORM, SERVER_TYPE.
actual=$(docker image inspect --format '{{.Os}}/{{.Architecture}}' "$IMAGE")
if [ "$actual" != "$PLATFORM" ]; then
  echo "modelImage $IMAGE is built for $actual, but serverType $SERVER_TYPE runs $PLATFORM: build it for $PLATFORM" \
    "(docker buildx build --platform $PLATFORM ...) or choose another serverType" >&2
  exit 1
fi
echo "$IMAGE: $actual"
