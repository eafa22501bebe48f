"""Exploration (not product): α=0.005 h_θ in-process on the cpu-preset ψ; PSNR / accuracy vs lr and steps."""
import json, sys, time, torch
from pp_flower.config import AppConfig
from pp_flower.data import load_splits, to_float
from pp_flower.features import load_feature_net
from pp_flower.checkpoints import load_classifier
from pp_flower.reference import train_in_process
from pp_flower.metrics import psnr

lr, epochs, alpha = float(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
limit = int(sys.argv[4]) if len(sys.argv) > 4 else 8192
torch.set_num_threads(int(sys.argv[5]) if len(sys.argv) > 5 else 1)
splits = load_splits("/work/shared/data/cifar10-jpeg", limit_train=20_000, limit_eval=2_000)
psi, _ = load_classifier("/work/repro/runs/reproduce-cpu/psi-resnet20/best.pt")
phi = load_feature_net("/work/shared/weights/vgg16_imagenet_features_0-15.pth")
cfg = AppConfig(alpha=alpha, epochs=epochs, batch_size=64, lr=lr, unet_base=16)
shard = splits.train_ids[:limit]
t0 = time.time()
net, losses = train_in_process(cfg, psi, phi, splits.train_all.images, splits.train_all.labels, shard)
net.eval(); psi.eval()
x = to_float(splits.test.images[:2000]); y = splits.test.labels[:2000]
with torch.no_grad():
    xh = torch.cat([net(x[i:i+250]) for i in range(0, 2000, 250)])
    acc = (torch.cat([psi(xh[i:i+250]).argmax(1) for i in range(0, 2000, 250)]) == y).float().mean().item()
    p = psnr(xh, x).median().item()
res = dict(lr=lr, epochs=epochs, alpha=alpha, limit=limit, steps=len(losses), acc=acc, psnr=p,
           last_losses=losses[-5:], nan=any(l != l for l, _ in losses), seconds=time.time() - t0)
print(json.dumps(res)); open("/work/main/runs/explore/results.jsonl", "a").write(json.dumps(res) + "\n")
