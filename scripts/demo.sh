#!/usr/bin/env bash
# Train a ResNet-18 on scikit-learn's bundled handwritten digits with
# MirroredStrategy over 2 logical CPU devices. Makes .venv if it is missing,
# installs tfpar into it, writes TensorBoard logs and summary.json to runs/demo/.
# Extra arguments are passed to tfpar-train (e.g. --epochs=2 or --profile_steps=10,12).
# The learning rate is 0.2 per 256 images, scaled linearly: 0.05 at batch 64.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh ""
echo "==> training resnet18 on digits, 2 replicas (runs/demo/)"
"$VENV/bin/tfpar-train" \
  --model=resnet18 --data=digits --image_size=32 \
  --strategy=mirrored --virtual_cpus=2 --precision=float32 \
  --batch_size=64 --epochs=5 --optimizer=sgd \
  --learning_rate=0.2 --lr_reference_batch=256 --lr_schedule=cosine \
  --model_dir=runs/demo "$@"
echo "==> TensorBoard: $VENV/bin/tensorboard --logdir runs/demo"
