#!/usr/bin/env bash
# Build (idempotently) the virtual environment in which the Avalanche side of the
# mmcl-vs-Avalanche speed benchmark runs (scripts/peers/avalanche_runner.py).
#
#   bash scripts/peers/setup_avalanche.sh [VENV_DIR]     # default: bench_results/.peers-venv
#
# Avalanche is never a dependency of mmcl and is never installed into the project's
# .venv. Instead a separate venv is created from the same interpreter, and a .pth file
# in it appends the project .venv's site-packages to sys.path: torch, torchvision, timm,
# numpy, safetensors, mmcl (editable) ... are reused from there (no second torch), while
# avalanche-lib 0.6.0 and the few extra packages it imports go into the new venv only.
# Every extra package is installed with --no-deps and a pinned version, so pip never
# resolves (or replaces) torch/torchvision. The list below is what `import avalanche`
# and Naive/Replay/EWC/LwF + EvaluationPlugin + accuracy metrics need at import/run time
# (found by trying); avalanche-lib's other declared dependencies are not needed for that.
#
# A relative VENV_DIR is taken relative to the repository root. The last line printed on
# stdout is the peers venv's python. The project .venv is only read, never modified:
# the script checks that its site-packages listing is unchanged.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
MAIN_VENV="${MMCL_MAIN_VENV:-$REPO_ROOT/.venv}"
MAIN_PY="$MAIN_VENV/bin/python"

PEERS="${1:-bench_results/.peers-venv}"
case "$PEERS" in /*) ;; *) PEERS="$REPO_ROOT/$PEERS" ;; esac
PEERS_PY="$PEERS/bin/python"

# Pinned, installed with --no-deps. Import-time needs of avalanche 0.6.0:
#   gdown (+requests, urllib3, charset-normalizer, certifi, beautifulsoup4, soupsieve):
#       avalanche.benchmarks.datasets
#   pytorchcv: avalanche.models;  gputil: evaluation.metrics.gpu_usage
#   wandb (+protobuf<5 for wandb 0.17, platformdirs, docker-pycreds, six, sentry-sdk):
#       imported unconditionally by evaluation.metrics.confusion_matrix. wandb 0.17.9 is
#       of avalanche 0.6's time; current wandb releases drag in opentelemetry & co.
#   torchmetrics (+lightning-utilities): evaluation.metrics.topk_acc
#   tensorboard (+absl-py): torch.utils.tensorboard in logging.tensorboard_logger;
#       2.18 accepts protobuf 4.x (2.21 needs protobuf>=6, which wandb 0.17 rejects)
#   qpsolvers (+quadprog, a solver, only to silence qpsolvers' "no QP solver" warning):
#       training.plugins.gem
REQS=(
  avalanche-lib==0.6.0
  gdown==6.5.1
  requests==2.34.2
  urllib3==2.8.0
  charset-normalizer==3.5.3
  certifi==2026.10.19.post1
  beautifulsoup4==4.15.0
  soupsieve==4.1.4
  pytorchcv==0.0.74
  gputil==1.4.0
  wandb==0.17.9
  protobuf==4.25.9
  platformdirs==4.14.9
  docker-pycreds==0.4.0
  six==1.17.0
  sentry-sdk==2.76.0
  torchmetrics==1.9.0
  lightning-utilities==0.15.3
  tensorboard==2.18.0
  absl-py==2.5.1
  qpsolvers==4.13.0
  quadprog==0.1.14
)

log() { echo "setup_avalanche: $*" >&2; }

[ -x "$MAIN_PY" ] || { log "no project venv at $MAIN_VENV (run scripts/setup.sh first)"; exit 1; }

site_dirs() {  # purelib and platlib of an interpreter, one per line, deduplicated
  "$1" -c 'import sysconfig
p = sysconfig.get_paths()
for d in dict.fromkeys([p["purelib"], p["platlib"]]):
    print(d)'
}
mapfile -t MAIN_SITES < <(site_dirs "$MAIN_PY")
fingerprint() { for d in "${MAIN_SITES[@]}"; do ls -1A "$d"; done | md5sum; }
MAIN_FP_BEFORE="$(fingerprint)"

# 1. The venv itself, from the same base interpreter as the project venv (same Python
#    version, so the project's compiled packages load). No pip of its own: the project
#    venv's pip is importable through the .pth below, and a bundled setuptools would
#    only shadow the project's newer one.
MAIN_VER="$("$MAIN_PY" -c 'import sys; print(sys.version)')"
if [ -x "$PEERS_PY" ] && [ "$("$PEERS_PY" -c 'import sys; print(sys.version)' 2>/dev/null)" != "$MAIN_VER" ]; then
  log "existing $PEERS uses another Python; recreating it"
  "$MAIN_PY" -m venv --clear --without-pip "$PEERS"
elif [ ! -x "$PEERS_PY" ]; then
  log "creating $PEERS"
  "$MAIN_PY" -m venv --without-pip "$PEERS"
fi

# 2. The .pth that makes the project venv's packages (and its own .pth files, e.g.
#    mmcl's editable finder) visible after the peers venv's own site-packages.
PEERS_SITE="$("$PEERS_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
mkdir -p "$PEERS_SITE"
"$PEERS_PY" - "$PEERS_SITE/_mmcl_main_venv.pth" "${MAIN_SITES[@]}" <<'EOF'
import sys
out, dirs = sys.argv[1], sys.argv[2:]
line = "import site; " + "; ".join(f"site.addsitedir({d!r})" for d in dirs) + "\n"
with open(out, "w") as f:
    f.write(line)
EOF

check() {
  "$PEERS_PY" -W ignore - "${MAIN_SITES[0]}" <<'EOF'
import sys
main_site = sys.argv[1]
import torch, timm, numpy, safetensors, mmcl
import avalanche
from avalanche.training import Naive, Replay, EWC, LwF
from avalanche.training.plugins import EvaluationPlugin
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.benchmarks.scenarios import benchmark_from_datasets
assert avalanche.__version__ == "0.6.0", avalanche.__version__
assert torch.__file__.startswith(main_site), f"torch not from the project venv: {torch.__file__}"
print(f"avalanche {avalanche.__version__}, torch {torch.__version__} ({torch.__file__}), timm {timm.__version__}",
      file=sys.stderr)
EOF
}

# 3. Packages. A stamp of the requirement list lets a rerun skip pip (and the network).
STAMP="$PEERS/.mmcl-peers-reqs"
WANT="$(printf '%s\n' "${REQS[@]}")"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && check 2>/dev/null; then
  log "already set up"
else
  "$PEERS_PY" -m pip --version >/dev/null 2>&1 || { log "pip not importable from $MAIN_VENV"; exit 1; }
  log "installing ${#REQS[@]} pinned packages (--no-deps) into $PEERS"
  PIP_REQUIRE_VIRTUALENV=1 "$PEERS_PY" -m pip install --quiet --disable-pip-version-check \
    --no-deps --no-input "${REQS[@]}"
  check
  printf '%s\n' "$WANT" > "$STAMP"
fi

if [ "$(fingerprint)" != "$MAIN_FP_BEFORE" ]; then
  log "ERROR: the project venv's site-packages changed during setup"; exit 1
fi
echo "$PEERS_PY"
