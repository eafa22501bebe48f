cd /work/repro && . /work/main/.venv/bin/activate
export PYTHONPATH=/work/repro PPFLOWER_DATA_DIR=/work/shared/data/cifar10-jpeg PPFLOWER_VGG_WEIGHTS=/work/shared/weights/vgg16_imagenet_features_0-15.pth PPFLOWER_QUIET=1 OMP_NUM_THREADS=1
while ! grep -q "psi-resnet20-pixel-per-image" runs/helper.log; do sleep 2; done
pkill -f "runs/helper.py"
sleep 2
echo "helper stopped at $(date)" >> runs/watch.log
python runs/helper_attacks.py > runs/helper_attacks.log 2>&1
echo "attack helper exited at $(date)" >> runs/watch.log
