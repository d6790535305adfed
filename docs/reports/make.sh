#!/usr/bin/env bash
# Make a linked report of docs/evaluation.md, from the repository root:
#   docs/reports/make.sh default|scientific|ml100k|mind [run id | training overrides...]
# Without a run id it trains the experiment first (default: +experiment=bert_ranker, a few minutes;
# scientific: +experiment=scientific, which reads ../shared/data/amazon-scientific unless an override
# such as data.root=/path/to/amazon-scientific says otherwise), then renders the report of that run
# into docs/reports/<name>/ and logs it to the run in MLflow as report/.
set -euo pipefail
name=${1:?usage: docs/reports/make.sh default|scientific|ml100k|mind [run id | training overrides...]}
case "$name" in
  default) experiment=bert_ranker ;;
  scientific) experiment=scientific ;;
  ml100k) experiment=ml100k ;;
  mind) experiment=mind ;;
  *) echo "unknown report '$name' (default, scientific, ml100k or mind)" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/../.."
# The run id is quoted for Hydra, which reads an id such as 1234e567... as a number.
if [ $# -ge 2 ] && [[ "$2" != *=* ]]; then
  source=(run_id="'$2'")
else
  # The run id from the job's last line ("MLflow run <id>; ..."), not "the latest run of the
  # experiment": someone else may have started one since.
  log=$(mktemp)
  python -m recsys.train +experiment="$experiment" "${@:2}" | tee "$log"
  run_id=$(sed -n 's/^MLflow run \([0-9a-f]*\);.*/\1/p' "$log")
  rm -f "$log"
  [ -n "$run_id" ] || { echo "no run id in the training output" >&2; exit 1; }
  source=(run_id="'$run_id'")
fi
rm -rf "docs/reports/$name"
python -m recsys.evaluate "${source[@]}" output_dir="docs/reports/$name"
# The ablation table over every report in docs/reports/ (every run, every data set).
python -m recsys.evaluation.ablation docs/reports/*/metrics.json > docs/reports/.ablation.md.tmp
mv docs/reports/.ablation.md.tmp docs/reports/ablation.md
