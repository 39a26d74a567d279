# Shared by the local packing scripts (pack.sh, pack_gemma.sh). Sourced, not run.
pack_support() {  # pack_support DIR CORPORA: the gguf wheel, the corpora tarball and the evaluation text into DIR
    local dir=$1 corpora=$2 cache="${PRUNEPATH_CACHE:-$HOME/.cache/prunepath}"
    mkdir -p "$dir/whl" "$dir/data/wikitext-2"
    python3 -m pip download --no-deps --only-binary=:all: -q -d "$dir/whl" --python-version 3.12 \
        --implementation py --platform any gguf
    python3 - "$corpora" <<'PY'
import sys
from prunepath.data.corpora import corpus_names, load_corpus
for name in corpus_names("mix:" + sys.argv[1]):
    print(name, len(load_corpus(name)), "documents")
PY
    local files=() names n
    IFS=',' read -ra names <<< "$corpora"
    for n in "${names[@]}"; do files+=("$n.jsonl"); done
    tar -C "$cache/corpora" -czf "$dir/corpora.tar.gz" "${files[@]}"
    python3 - "$dir" <<'PY'
import shutil
import sys
from prunepath.evaluation.common import resolve_data_path
shutil.copy(resolve_data_path("wikitext-2/wiki.valid.raw"), f"{sys.argv[1]}/data/wikitext-2/wiki.valid.raw")
PY
}
