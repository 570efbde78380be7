#!/usr/bin/env bash
# Create the Python virtual environment that runs the KServe iris predictor
# (predictors/kserve_iris/iris_server.py) and install its pinned packages.
#
# Usage: scripts/setup-venv.sh [VENV_DIR]
#   VENV_DIR  defaults to .venv-kserve in the repository root.
#   PYTHON    environment variable, the interpreter to build the venv from
#             (default: python3). It must be Python 3.11.
#
# The script is idempotent. It stores a hash of the requirement files in the
# venv and returns at once when that hash still matches, so it is safe to call
# before every test run.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv_dir="${1:-$repo_root/.venv-kserve}"
python="${PYTHON:-python3}"
predictor_dir="$repo_root/predictors/kserve_iris"
requirements="$predictor_dir/requirements.txt"
constraints="$predictor_dir/constraints.txt"
stamp="$venv_dir/.requirements.sha256"

for file in "$requirements" "$constraints"; do
    if [[ ! -f "$file" ]]; then
        echo "setup-venv: $file not found. Run this script from a full checkout." >&2
        exit 1
    fi
done

# Both files decide what gets installed, so both go into the hash.
wanted_hash="$(cat "$requirements" "$constraints" | sha256sum | cut -d' ' -f1)"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$wanted_hash" ]] \
    && "$venv_dir/bin/python" -c 'pass' 2>/dev/null; then
    echo "setup-venv: $venv_dir is up to date"
    exit 0
fi

if ! command -v "$python" >/dev/null; then
    echo "setup-venv: interpreter '$python' not found. Install python3 or set PYTHON." >&2
    exit 1
fi
python_version="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [[ "$python_version" != "3.11" ]]; then
    echo "setup-venv: $python is Python $python_version, but the pins were tested on 3.11." \
        "Set PYTHON to a Python 3.11 interpreter." >&2
    exit 1
fi

start_ns="$(date +%s%N)"

create_venv() {
    # --clear rebuilds a venv whose interpreter no longer runs.
    "$python" -m venv --clear "$venv_dir"
}

if ! "$venv_dir/bin/python" -c 'pass' 2>/dev/null; then
    echo "setup-venv: creating $venv_dir with $python (Python $python_version)"
    if ! create_venv; then
        # Debian ships venv's ensurepip in a separate package.
        if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
            echo "setup-venv: python3 -m venv failed; installing Debian's python3-venv and retrying"
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
            create_venv || {
                echo "setup-venv: '$python -m venv $venv_dir' failed again after installing" \
                    "python3-venv. Check that $python is Debian's python3 or has ensurepip." >&2
                exit 1
            }
        else
            echo "setup-venv: '$python -m venv $venv_dir' failed. On Debian or Ubuntu" \
                "install the python3-venv package, then run this script again." >&2
            exit 1
        fi
    fi
fi

# Drop the stamp first, so an interrupted install is redone on the next call.
rm -f "$stamp"
echo "setup-venv: installing packages from $requirements"
"$venv_dir/bin/python" -m pip install --disable-pip-version-check --quiet \
    --requirement "$requirements"
"$venv_dir/bin/python" -c 'import kserve, sklearn' || {
    echo "setup-venv: packages installed into $venv_dir but 'import kserve, sklearn'" \
        "failed. Delete $venv_dir and run this script again." >&2
    exit 1
}
echo "$wanted_hash" > "$stamp"

elapsed_ms=$(( ($(date +%s%N) - start_ns) / 1000000 ))
printf 'setup-venv: installed into %s in %d.%01d s (%s on disk)\n' \
    "$venv_dir" $((elapsed_ms / 1000)) $((elapsed_ms % 1000 / 100)) \
    "$(du -sh "$venv_dir" | cut -f1)"
