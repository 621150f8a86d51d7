#!/usr/bin/env bash
# Set up tritonchat on a Debian/Ubuntu machine with python3 >= 3.10:
#   .venv/ (created if missing), pip install -e '.[test,load]', then the Triton Python backend directory
#   (tritonchat setup-server: stub for this Python, and one probe start of tritonserver).
# Idempotent; a second run skips pip while pyproject.toml and the Python are unchanged.
#
#   ./setup.sh            # set up / check
#   ./setup.sh --force    # re-run pip even when nothing changed (also: SETUP_FORCE=1)
#   PYTHON=python3.11 ./setup.sh   # choose the interpreter the venv is made from
#
# torch: pip takes whatever wheel it finds first; a CPU-only wheel on a configured find-links path
# (pip config) is picked up as it is. Nothing here forces a CUDA build.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
ROOT="$(pwd)"
VENV="$ROOT/.venv"
VPY="$VENV/bin/python"
TRITONCHAT="$VENV/bin/tritonchat"
STAMP="$VENV/.tritonchat-setup"
FORCE="${SETUP_FORCE:-0}"
for arg in "$@"; do
  case "$arg" in
    --force) FORCE=1 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done

if [ -t 1 ]; then B=$'\033[1;34m' G=$'\033[1;32m' R=$'\033[1;31m' N=$'\033[0m'; else B="" G="" R="" N=""; fi
say()  { printf '%s==>%s %s\n' "$B" "$N" "$*"; }
ok()   { printf '%s ok%s %s\n' "$G" "$N" "$*"; }
die()  { printf '%serror:%s %s\n' "$R" "$N" "$*" >&2; exit 1; }

# --- 1. the interpreter ------------------------------------------------------------------------------
if [ ! -x "$VPY" ]; then
  PY="${PYTHON:-python3}"
  command -v "$PY" >/dev/null 2>&1 || die "$PY not found: install Python >= 3.10 (apt-get install python3 python3-venv)"
  "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
    || die "$("$PY" -V 2>&1) is too old: tritonchat needs Python >= 3.10 (set PYTHON=python3.X)"
  PYVER="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
  "$PY" -c 'import venv, ensurepip' 2>/dev/null \
    || die "$PY has no working venv module: apt-get install python3-venv (or python${PYVER}-venv)"
  say "creating $VENV with $("$PY" -V 2>&1) ($(command -v "$PY"))"
  "$PY" -m venv "$VENV" || die "python -m venv failed: apt-get install python${PYVER}-venv, then rm -rf .venv and re-run"
  FORCE=1
fi
"$VPY" -c 'pass' 2>/dev/null || die "$VPY does not run (its base Python moved or was removed?): rm -rf .venv and re-run"
PYVER="$("$VPY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
"$VPY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
  || die ".venv has Python $PYVER; tritonchat needs >= 3.10: rm -rf .venv and re-run with PYTHON=python3.X"
ok "Python $PYVER in $VENV"

# --- 2. libpython for Triton's Python backend stub -----------------------------------------------------
# The stub (python_backend_stubs/3.X/triton_python_backend_stub) links libpython3.X.so.1.0. It is found
# either in the system library cache or, for a shared-library build (pyenv, conda), next to the interpreter.
SONAME="libpython${PYVER}.so.1.0"
OWN_LIB="$("$VPY" -c 'import sysconfig, os
d, n = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
p = os.path.join(d or "", n or "")
print(p if sysconfig.get_config_var("Py_ENABLE_SHARED") and os.path.isfile(p) else "")')"
if /sbin/ldconfig -p 2>/dev/null | grep -q "$SONAME" || ldconfig -p 2>/dev/null | grep -q "$SONAME"; then
  ok "$SONAME (system)"
elif [ -n "$OWN_LIB" ]; then
  ok "$SONAME ($OWN_LIB)"
else
  die "$SONAME is not installed; Triton's Python backend stub needs it. Install it with: apt-get install libpython${PYVER}"
fi

# --- 3. the package -------------------------------------------------------------------------------------
WANT="$( (cat pyproject.toml; echo "$PYVER"; "$VPY" -c 'import sys; print(sys.executable)') | sha256sum | cut -d' ' -f1)"
HAVE="$(cat "$STAMP" 2>/dev/null || true)"
INSTALLED_HERE="$("$VPY" - <<'EOF' 2>/dev/null || true
import importlib.metadata as md, pathlib, tritonchat
for dist in ("nvidia-pytriton", "tritonclient", "torch", "onnxruntime", "pytest", "locust"):
    md.version(dist)
print(pathlib.Path(tritonchat.__file__).resolve().parent.parent)
EOF
)"
if [ "$FORCE" = 1 ] || [ "$WANT" != "$HAVE" ] || [ "$INSTALLED_HERE" != "$ROOT" ]; then
  say "upgrading pip"
  "$VPY" -m pip install --quiet --upgrade pip || die "pip could not be upgraded (is PyPI reachable?)"
  # A CPU-only torch wheel on a pip find-links path (pip config / $PIP_FIND_LINKS) is installed first, so that
  # pip does not reach for a newer CUDA build on the index. TORCH_CPU_WHEEL=0 skips this.
  if [ "${TORCH_CPU_WHEEL:-1}" != 0 ] && ! "$VPY" -c 'import importlib.metadata as m; m.version("torch")' 2>/dev/null; then
    CPU_WHEEL="$("$VPY" - <<'EOF' 2>/dev/null || true
import glob, os, platform, re, subprocess, sys
out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
dirs = re.findall(r"find-links='([^']*)'", out) + [os.environ.get("PIP_FIND_LINKS", "")]
tag = "cp%d%d" % sys.version_info[:2]
found = set()
for entry in " ".join(dirs).split():
    d = entry[len("file://"):] if entry.startswith("file://") else entry
    if os.path.isdir(d):
        found.update(glob.glob(os.path.join(d, f"torch-*+cpu-{tag}-{tag}-*linux*_{platform.machine()}.whl")))
def key(path):
    return [int(x) for x in re.findall(r"\d+", os.path.basename(path).split("-")[1].split("+")[0])]
print(sorted(found, key=key)[-1] if found else "")
EOF
)"
    if [ -n "$CPU_WHEEL" ]; then
      say "installing the CPU-only torch wheel found on pip's find-links path: $(basename "$CPU_WHEEL")"
      "$VPY" -m pip install "$CPU_WHEEL" || die "pip install $CPU_WHEEL failed (see above)"
    fi
  fi
  say "pip install -e '.[test,load]' (first run: several minutes, torch is large)"
  "$VPY" -m pip install -e '.[test,load]' || die "pip install -e '.[test,load]' failed (see above)"
  echo "$WANT" > "$STAMP"
  ok "installed tritonchat and its dependencies"
else
  ok "tritonchat already installed (pyproject.toml unchanged; ./setup.sh --force re-runs pip)"
fi

# --- 4. Triton backend directory ------------------------------------------------------------------------
say "preparing the Triton backend directory"
"$TRITONCHAT" setup-server || die "the Triton server set-up failed (see above); 'tritonchat doctor' shows what is missing"

# --- 5. perf_analyzer (optional) --------------------------------------------------------------------------
# >>> perf_analyzer: .tools/bin/perf_analyzer (wheel + newer glibc loader where needed); never fatal
# Idempotent (a working install is kept). PERF_ANALYZER=0 skips it.
if [ "${PERF_ANALYZER:-1}" != 0 ]; then
  say "perf_analyzer (.tools/, git-ignored)"
  if "$TRITONCHAT" install-perf-analyzer; then
    ok "perf_analyzer: $ROOT/.tools/bin/perf_analyzer"
  else
    printf '%swarning:%s perf_analyzer was not installed (see above); everything else works without it.\n' "$R" "$N" >&2
  fi
fi
# <<< perf_analyzer

ok "done. Next: source .venv/bin/activate && tritonchat doctor && tritonchat quickstart"
