#!/usr/bin/env bash
# Render every kustomization under deploy/ with `kubectl kustomize` and validate each
# rendered object against the Kubernetes JSON schemas (PyPI kubernetes-validate, strict
# mode), plus the checks in deploy/check/validate_manifests.py. Exits non-zero and names
# what failed when any build or check fails.
#
# Usage: scripts/check-deploy.sh
#   KUBERNETES_VERSIONS  space-separated Kubernetes versions to validate against
#                        (default "1.30 1.37": the oldest version whose preStop sleep
#                        action is on by default, and the newest that the pinned
#                        kubernetes-validate has schemas for).
#   PYTHON               interpreter to create .venv-deploy from (default: python3).
#
# Needs kubectl (tested with v1.32, which has kustomize built in) and Python 3.11 or
# newer with pip. The venv .venv-deploy in the repository root is created on the first
# run and reused while deploy/check/requirements.txt is unchanged.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

kubernetes_versions="${KUBERNETES_VERSIONS:-1.30 1.37}"
python="${PYTHON:-python3}"
venv_dir="$repo_root/.venv-deploy"
requirements="deploy/check/requirements.txt"
stamp="$venv_dir/.requirements.sha256"

# Every folder with a kustomization.yaml. The rendered file is named after the folder.
builds=(
    deploy/base
    deploy/examples/gpu-predictor
    deploy/overlays/production
    deploy/overlays/with-example-predictor
)
adapter_configs=(deploy/examples/gpu-predictor/prometheus-adapter-rules.yaml)

fail() {
    echo "check-deploy: $*" >&2
    exit 1
}

if ! command -v kubectl >/dev/null; then
    fail "kubectl not found in PATH. Install kubectl (this check was tested with v1.32," \
        "which has kustomize v5.5 built in), then run this script again."
fi

# A kustomization that is not in the list would never be checked.
while IFS= read -r found; do
    folder="$(dirname "$found")"
    listed=false
    for build in "${builds[@]}"; do
        [[ "$build" == "$folder" ]] && listed=true
    done
    $listed || fail "$folder has a kustomization.yaml but is not in the builds list of $0; add it."
done < <(find deploy -name kustomization.yaml | sort)

# kustomize reads files only from inside a kustomization's folder, so the base contains
# a copy of the configuration.
if ! cmp -s config/kubernetes.toml deploy/base/coldgate.toml; then
    diff -u config/kubernetes.toml deploy/base/coldgate.toml >&2 || true
    fail "deploy/base/coldgate.toml differs from config/kubernetes.toml. Edit" \
        "config/kubernetes.toml, then run: cp config/kubernetes.toml deploy/base/coldgate.toml"
fi

# --- Python venv with the pinned validator -----------------------------------------
wanted_hash="$(sha256sum "$requirements" | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$wanted_hash" ]] \
    && "$venv_dir/bin/python" -c 'pass' 2>/dev/null; then
    :
else
    command -v "$python" >/dev/null \
        || fail "interpreter '$python' not found. Install python3 or set PYTHON."
    # The validator uses tomllib, and the pinned rpds-py needs 3.11 too.
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || fail "$python is Python $("$python" -c 'import platform; print(platform.python_version())')," \
            "but the check needs 3.11 or newer. Set PYTHON to such an interpreter."
    if ! "$venv_dir/bin/python" -c 'pass' 2>/dev/null; then
        echo "check-deploy: creating $venv_dir with $python"
        if ! "$python" -m venv --clear "$venv_dir"; then
            # Debian ships venv's ensurepip in a separate package.
            if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
                echo "check-deploy: '$python -m venv' failed. Installing Debian's python3-venv and retrying."
                apt-get update -qq
                DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
                "$python" -m venv --clear "$venv_dir" \
                    || fail "'$python -m venv $venv_dir' failed again after installing python3-venv."
            else
                fail "'$python -m venv $venv_dir' failed. On Debian or Ubuntu install the" \
                    "python3-venv package, then run this script again."
            fi
        fi
    fi
    # The venv ignores itself, so git status stays clean without a .gitignore entry.
    echo '*' > "$venv_dir/.gitignore"
    # Drop the stamp first, so an interrupted install is redone on the next run.
    rm -f "$stamp"
    echo "check-deploy: installing $requirements into $venv_dir"
    "$venv_dir/bin/python" -m pip install --disable-pip-version-check --quiet \
        --requirement "$requirements" \
        || fail "pip could not install $requirements into $venv_dir. Check that PyPI is" \
            "reachable and that $python is 3.11 or newer."
    echo "$wanted_hash" > "$stamp"
fi

# --- Render -------------------------------------------------------------------------
rendered_dir="$(mktemp -d)"
trap 'rm -rf "$rendered_dir"' EXIT

echo "check-deploy: $(kubectl version --client 2>/dev/null | head -n 2 | paste -sd ',' -)"
render_failed=false
rendered=()
for build in "${builds[@]}"; do
    # deploy/overlays/production -> overlays-production.yaml
    name="${build#deploy/}"
    output="$rendered_dir/${name//\//-}.yaml"
    if kubectl kustomize "$build" > "$output" 2> "$rendered_dir/stderr"; then
        rendered+=("$output")
    else
        render_failed=true
        echo "FAIL ${name//\//-}: kubectl kustomize $build failed:"
        sed 's/^/       /' "$rendered_dir/stderr"
    fi
done

# --- Validate -----------------------------------------------------------------------
version_args=()
for version in $kubernetes_versions; do
    version_args+=(--kubernetes-version "$version")
done
adapter_args=()
for config in "${adapter_configs[@]}"; do
    adapter_args+=(--adapter-config "$config")
done

echo "check-deploy: kubernetes-validate $("$venv_dir/bin/python" -c \
    'import kubernetes_validate; print(kubernetes_validate.__version__)')," \
    "Kubernetes versions: $kubernetes_versions"
validate_status=0
if (( ${#rendered[@]} > 0 )); then
    "$venv_dir/bin/python" deploy/check/validate_manifests.py \
        "${version_args[@]}" "${adapter_args[@]}" "${rendered[@]}" || validate_status=$?
fi

if $render_failed || (( validate_status != 0 )); then
    fail "FAILED: see the messages above."
fi
echo "check-deploy: all ${#builds[@]} builds passed"
