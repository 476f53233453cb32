#!/usr/bin/env bash
# The quickstart: install, then train a small GPT end to end on CPU on real text, tracked in MLflow.
#   1. documents: the Python documentation sources installed by Debian's python3.11-doc (PSF License)
#   2. the corpus stages (configs/data/quickstart.yaml): language ID, Gopher rules, dedup, a report
#   3. a SentencePiece BPE tokenizer (byte fallback, <|endoftext|>) trained on the kept documents
#   4. tokenized into a Megatron indexed dataset (.bin/.idx), two worker processes
#   5. 300 steps of training (configs/quickstart.yaml): validation loss drops, a sample is printed
# Everything lands in runs/quickstart/ (recreated on every run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launcher/install.sh
export PATH="$PWD/.venv/bin:$PATH"

RUN=runs/quickstart
DOCS=/usr/share/doc/python3.11/html/_sources
rm -rf "$RUN"
mkdir -p "$RUN/data"
gptforge files-to-jsonl "$DOCS" -o "$RUN/data/pydocs.jsonl" \
  --glob 'tutorial/*.rst.txt' --glob 'faq/*.rst.txt' --glob 'howto/*.rst.txt' \
  --glob 'reference/*.rst.txt' --glob 'using/*.rst.txt'
gptforge corpus build --config configs/data/quickstart.yaml --quiet
gptforge tokenizer train --input "$RUN"/data/corpus/*.jsonl.zst --output "$RUN/data/tokenizer" --vocab-size 4096
gptforge tokenize --input "$RUN"/data/corpus/*.jsonl.zst --output "$RUN/data/pydocs" \
  --tokenizer "$RUN/data/tokenizer.model" --workers 2
gptforge train --config configs/quickstart.yaml "$@"

echo
echo "Corpus report: $RUN/data/corpus/report.json    loss curve: $RUN/loss_curve.png    metrics: $RUN/metrics.jsonl"
echo "MLflow UI:  .venv/bin/mlflow ui --backend-store-uri sqlite:///$PWD/$RUN/mlflow.db"
