#!/usr/bin/env bash
# Every device call sends the tracked tree along with what it carries, 64 MiB in all; the tree is
# ~16 MB, 12.5 MB of it adapters that no GPU run but the engine's real-pair check reads (the shipped
# ARMs). For a staging stretch, `slim` keeps those out of what travels (dropped from the index,
# ignored in .git/info/exclude; the files stay on disk), so a call can carry ~62 MB instead of
# ~50 MB; `restore` puts them back. Never commit
# while slimmed: `git status` shows the files as deleted.
#   bash bench/device_tree.sh slim | restore | size
set -euo pipefail
cd "$(dirname "$0")/.."  # the repository this script is in, wherever it is called from
big=(server/default_arms/positive/adapter_model.safetensors
     server/default_arms/objective/adapter_model.safetensors
     bench/quality/arms/harmless/adapter_model.safetensors)
case "${1:-size}" in
  slim)
    for f in "${big[@]}"; do grep -qxF "/$f" .git/info/exclude || echo "/$f" >> .git/info/exclude; done
    git rm -q --cached -- "${big[@]}" ;;
  restore)
    git reset -q HEAD -- "${big[@]}"
    for f in "${big[@]}"; do sed -i "\\#^/$f\$#d" .git/info/exclude; done ;;
  size) ;;
  *) echo "usage: bash bench/device_tree.sh slim|restore|size" >&2; exit 2 ;;
esac
# What travels besides the carried folders: tracked files plus untracked ones git does not ignore.
git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1
