cd /work/repro && . /work/main/.venv/bin/activate
export PYTHONPATH=/work/repro PPFLOWER_DATA_DIR=/work/shared/data/cifar10-jpeg PPFLOWER_VGG_WEIGHTS=/work/shared/weights/vgg16_imagenet_features_0-15.pth PPFLOWER_QUIET=1
python runs/helper2.py > runs/helper2.log 2>&1 &
while ! python -c "import json,sys; s=json.load(open('results/cpu/stages.json')); sys.exit(0 if s.get('transform-resnet20-a0.1',{}).get('finished') else 1)" 2>/dev/null; do sleep 1; done
pkill -f "'ppflower','reproduce'"
echo "main stopped after the alpha stages at $(date)" >> runs/watch.log
wait
echo "helper2 exited at $(date)" >> runs/watch.log
