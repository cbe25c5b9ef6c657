# Sourced by the launch scripts: go to the repository root, set up .venv (idempotent), activate
# it, and keep every Hugging Face library offline.
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash launch/setup.sh
source .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# train_once RUN_DIR CONFIG MESSAGE: a model the demos prepare (a teacher), trained with CONFIG (whose
# output_dir is RUN_DIR) unless RUN_DIR/student already holds its export; a run that did not finish
# is removed and started again.
train_once() {
    if [ ! -f "$1/student/model.safetensors" ]; then
        echo "== $3"
        rm -rf "$1"
        distill train "$2"
    fi
}
