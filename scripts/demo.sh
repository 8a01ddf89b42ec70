#!/usr/bin/env bash
# Set everything up, then run the demo: a virtual node built from network
# namespaces, meshed by nodemesh, shown through the CLI, then torn down.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$here/scripts/setup.sh"
exec "$here/.venv/bin/nodemesh" demo "$@"
