#!/usr/bin/env bash
# Make Fashion-MNIST available offline: the Debian package when running as root with apt,
# otherwise leave it to torchvision's download (into ./data) at first use.
set -euo pipefail
DEB_DIR=/usr/share/datasets/fashion-mnist
if [ -f "$DEB_DIR/train-images-idx3-ubyte.gz" ]; then
  echo "Fashion-MNIST: $DEB_DIR"
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
  echo "Installing Debian package dataset-fashion-mnist ..."
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; }
  echo "Fashion-MNIST: $DEB_DIR"
else
  echo "Not root or no apt-get: Fashion-MNIST will be downloaded by torchvision into ./data on first use."
fi
