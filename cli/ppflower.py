"""``ppflower``: the command line, the outermost layer (it imports the library, the apps, the runtime and the
experiments; nothing imports it). Each command is a thin call into the modules below."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from pp_flower.errors import PPFlowerError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Privacy-preserving image classification: train a transformation network h_θ with a provider's "
         "classifier ψ on Flower, and measure how well it protects images.",
)
console = Console()
err_console = Console(stderr=True, soft_wrap=True)

DataDir = typer.Option(None, "--data-dir", envvar="PPFLOWER_DATA_DIR",
                       help="ImageFolder tree with train/ and test/; unset = download CIFAR-10 via torchvision.")
VggWeights = typer.Option(None, "--vgg-weights", envvar="PPFLOWER_VGG_WEIGHTS",
                          help="State dict of VGG16 ImageNet features (φ); unset = torchvision's cache/download.")
Device = typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto (GPU when present).")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"pp-flower {version('pp-flower')} (flwr {version('flwr')}, torch {version('torch')})")
        raise typer.Exit()


@app.callback()
def _main(_version_flag: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                             help="Print the versions of pp-flower, Flower and torch, then exit.")):
    """Privacy-preserving image classification: train a transformation network h_θ with a provider's classifier ψ
    on Flower, and measure how well it protects images."""


def lock_out(path: Path, what: str = "--out") -> None:
    """One run per output directory of a resumable command (held until this process ends; see runtime/runlock.py)."""
    from pp_flower.checkpoints import ensure_writable_dir
    from runtime.runlock import lock_dir

    ensure_writable_dir(path, what)  # its one line (names the path and why) before the lock file is tried
    lock_dir(path, what)


def resolve_device(device: str) -> str:
    """--device: the project's one rule (pp_flower.config.resolve_device), checked against this machine."""
    from pp_flower.config import resolve_device as resolve

    return resolve(device, "--device")


@app.command("train-classifier")
def train_classifier_cmd(
    model: str = typer.Option("resnet20", "--model", help="ψ architecture: resnet20 or vgg16 (VGG16-BN)."),
    epochs: int = typer.Option(200, min=1, help="Epochs (the paper: 200; lr ×0.2 at 30/60/80 %)."),
    limit_train: Optional[int] = typer.Option(None, "--limit-train", min=0, help="Use only the first N training "
                                                                                 "images (0: all)."),
    limit_eval: Optional[int] = typer.Option(None, "--limit-eval", min=0, help="Use only the first N validation/test "
                                                                               "images (0: all)."),
    batch_size: int = typer.Option(128, "--batch-size", min=1),
    lr: float = typer.Option(0.1, help="Peak learning rate (> 0)."),
    seed: int = typer.Option(0, min=0),
    checkpoint_every: int = typer.Option(10, "--checkpoint-every", min=0, help="Steps between resume checkpoints "
                                                                                 "(does not change the result)."),
    schedule: str = typer.Option("step", "--schedule", help="step: the paper's lr ×0.2 at 30/60/80 %; onecycle: "
                                                            "warm-up to --lr, then linear decay to 0 (short runs)."),
    label_smoothing: float = typer.Option(0.0, "--label-smoothing", min=0.0, max=0.99,
                                          help="Cross-entropy label smoothing (the paper: 0)."),
    fast: bool = typer.Option(False, "--fast", help="Channels-last + bfloat16 autocast in the training step "
                                                    "(evaluation stays fp32); ~1.8× on a CPU with AVX512-BF16. "
                                                    "Without native bf16 it keeps fp32 "
                                                    "(emulated bf16 is ~12× slower)."),
    baseline: str = typer.Option("", "--baseline", help="Train ψ on protected images: tanaka, pixel, pixel-per-image, "
                                                        "or gan (with --transform from `ppflower train-gan`)."),
    key: int = typer.Option(0, "--key", min=0, help="The baseline's key (stored in the checkpoint and metrics)."),
    transform: Optional[Path] = typer.Option(None, "--transform", help="--baseline gan: the generator checkpoint."),
    out: Path = typer.Option(Path("runs/classifier"), "--out", help="Output dir: last.pt, best.pt, metrics.json."),
    data_dir: Optional[Path] = DataDir,
    device: str = Device,
):
    """Step (1): the provider trains ψ. Resumes from OUT/last.pt when present (kill it and run again)."""
    from pp_flower.classifier import ClassifierConfig, train_classifier
    from pp_flower.data import load_splits
    from pp_flower.models import CLASSIFIERS

    if model not in CLASSIFIERS:
        raise PPFlowerError(f"--model must be one of {', '.join(CLASSIFIERS)}, got '{model}'.")
    cfg = ClassifierConfig(arch=model, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                           checkpoint_every=checkpoint_every, baseline=baseline, key=key, schedule=schedule,
                           label_smoothing=label_smoothing, fast=fast,
                           transform=str(transform or ""))
    if transform is not None:  # an output never replaces an input: --out D with --transform D/best.pt
        from pp_flower.evaluation import refuse_overwriting_inputs

        refuse_overwriting_inputs([out / name for name in ("last.pt", "best.pt", "metrics.json")],
                                  {"--transform": transform}, "--out")
    device = resolve_device(device)
    splits = load_splits(data_dir, seed=seed, limit_train=limit_train, limit_eval=limit_eval)
    lock_out(out)
    metrics = train_classifier(splits, out, cfg, device=device, log=console.print)
    console.print(f"[bold green]ψ ({model}) test accuracy: {metrics['test-accuracy']:.4f}[/]")
    if metrics.get("at-chance"):
        err_console.print("[bold red]ψ is at chance level on validation: it learned nothing (see the warning above); "
                          "results measured through it mean nothing.[/]", highlight=False)


@app.command("train-gan")
def train_gan_cmd(
    epochs: int = typer.Option(200, min=1, help="Epochs of the conditional GAN."),
    limit_train: Optional[int] = typer.Option(None, "--limit-train", min=0, help="Use only the first N training "
                                                                                 "images (0: all)."),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    unet_base: int = typer.Option(16, "--unet-base", min=4, help="Generator U-Net width (64 = the full U-Net)."),
    l1_weight: float = typer.Option(100.0, "--l1-weight", min=0.0,
                                    help="λ: weight of ‖G(x) − E(x)‖₁ beside the GAN loss."),
    target: str = typer.Option("pixel", "--target", help="Encryption G imitates: pixel or pixel-per-image."),
    key: int = typer.Option(0, "--key", min=0, help="That encryption's key (training only; G has no key)."),
    seed: int = typer.Option(0, min=0),
    out: Path = typer.Option(Path("runs/gan"), "--out", help="Output dir: transform.pt, metrics.json, last.pt."),
    data_dir: Optional[Path] = DataDir,
    device: str = Device,
):
    """Baseline: the GAN-based transformation (Sirichotedumrong & Kiya 2020); then `train-classifier --baseline gan`."""
    from pp_flower.baselines.gan import GanConfig, train_gan_transform
    from pp_flower.data import load_splits

    cfg = GanConfig(epochs=epochs, batch_size=batch_size, unet_base=unet_base, l1_weight=l1_weight, target=target,
                    key=key, seed=seed)
    device = resolve_device(device)
    splits = load_splits(data_dir, seed=seed, limit_train=limit_train, limit_eval=1)
    lock_out(out)
    train_gan_transform(splits, out, cfg, device=device, log=console.print)
    console.print(f"[green]generator → {out / 'transform.pt'}[/]")


@app.command()
def attack(
    transform: Optional[Path] = typer.Option(None, "--transform", help="A user's h_θ checkpoint (best.pt) to attack."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir",
                                           help="A finished simulation: attack every user's best.pt."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="A keyed encryption to attack: tanaka, pixel or "
                                                                   "pixel-per-image."),
    key: int = typer.Option(0, "--key", min=0, help="The baseline's key (stored with the results)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output dir (default: RUN_DIR/attack or runs/attack)."),
    epochs: int = typer.Option(200, min=1, help="Attacker epochs (the paper: 200, lr ×0.2 at 30/60/80 %)."),
    batch_size: int = typer.Option(128, "--batch-size", min=1),
    lr: float = typer.Option(0.1, help="Learning rate (> 0)."),
    unet_base: int = typer.Option(16, "--unet-base", min=4, help="Attacker U-Net width (the paper: 64)."),
    unet_depth: int = typer.Option(4, "--unet-depth", min=1, max=6, help="Attacker U-Net depth (image sides must be "
                                                                          "divisible by 2**depth)."),
    strong: bool = typer.Option(False, "--strong", help="Also run the stronger attackers: the ITN with a VGG feature "
                                                       "loss and the paired restorer (Adam, L1 + VGG perceptual)."),
    restorer: bool = typer.Option(False, "--restorer", help="Also run the paired restorer (implied by --strong)."),
    restorer_lr: float = typer.Option(1e-3, "--restorer-lr", help="The restorer's Adam learning rate (≤ 0.01)."),
    restorer_perceptual: float = typer.Option(0.01, "--restorer-perceptual-weight", min=0.0,
                                              help="The restorer's VGG perceptual-loss weight (beside L1 at 1)."),
    adversarial_weight: float = typer.Option(0.0, "--adversarial-weight", min=0.0,
                                             help="The restorer's PatchGAN adversarial-loss weight (0 = none)."),
    wire: Optional[str] = typer.Option(None, "--wire", help="What the provider received: uint8 or float32 (default: "
                                                            "the run's, from RUN_DIR/run.json; float32 adds "
                                                            "attackers on logit(x̂))."),
    observer: Optional[Path] = typer.Option(None, "--observer", help="A classifier trained on plain images: its "
                                                                     "accuracy on the estimates measures what an "
                                                                     "attack recognises (best attack by it too)."),
    labels: bool = typer.Option(False, "--labels", help="Label inference instead of image attacks: what each user of "
                                                        "--run-dir infers of the provider's labels from the "
                                                        "gradients it received (seconds)."),
    perceptual_weight: float = typer.Option(1e-4, "--perceptual-weight", min=0.0,
                                            help="Feature-loss weight of --strong."),
    force: bool = typer.Option(False, "--force", help="Recompute attacks whose cached results in OUT came from another "
                                                      "target or other settings (otherwise refused)."),
    limit_train: Optional[int] = typer.Option(None, "--limit-train", min=0,
                                              help="Attacker's training pairs (default or 0: all 45,000)."),
    limit_eval: Optional[int] = typer.Option(None, "--limit-eval", min=0,
                                             help="Validation/test images (default or 0: all 5,000/10,000)."),
    data_dir: Optional[Path] = DataDir,
    vgg_weights: Optional[Path] = VggWeights,
    device: str = Device,
):
    """How much comes back of what the provider received: the ITN-Attack (and, with --strong, stronger attackers)
    train on pairs (what the provider holds, x) and are measured by PSNR, SSIM and an observer; with --labels,
    the labels a user infers from its gradients. Results: OUT/summary.json (best attack per target)."""
    from pp_flower.attack import AttackConfig, restorer_config
    from pp_flower.evaluation import attack_targets, label_inference
    from pp_flower.wire import WIRES

    if run_dir is not None and not run_dir.is_dir():  # before the lock, which would create RUN_DIR/attack
        raise PPFlowerError(f"Run directory {run_dir} does not exist.")
    if labels:
        if run_dir is None:
            raise PPFlowerError("--labels needs --run-dir: the users' kept gradients are in RUN_DIR/user-K/.")
        ignored = [name for name, given in (("--transform", transform), ("--baseline", baseline), ("--wire", wire),
                                            ("--strong", strong), ("--restorer", restorer), ("--observer", observer))
                   if given]
        if ignored:
            raise PPFlowerError(f"--labels measures label inference only; {', '.join(ignored)} belong to the image "
                                "attacks (run them in a separate call).")
        lock_out(out or run_dir / "attack")
        label_inference(run_dir, data_dir, out, log=console.print)
        return
    if wire is not None and wire not in WIRES:
        raise PPFlowerError(f"--wire must be one of {', '.join(WIRES)}, got {wire!r}.")
    if wire is not None and baseline is not None and transform is None and run_dir is None:
        raise PPFlowerError("--wire applies to h_θ's x̂; a baseline's encrypted images travel as 8-bit images.")
    import math

    if not (math.isfinite(restorer_lr) and 0 < restorer_lr <= 0.01):
        raise PPFlowerError(f"--restorer-lr must be in (0, 0.01] (Adam), got {restorer_lr!r}.")
    for option, value in (("--restorer-perceptual-weight", restorer_perceptual),
                          ("--adversarial-weight", adversarial_weight)):
        if not math.isfinite(value):
            raise PPFlowerError(f"{option} must be a finite number ≥ 0, got {value!r}.")
    cfg = AttackConfig(epochs=epochs, batch_size=batch_size, lr=lr, unet_base=unet_base, unet_depth=unet_depth)
    AttackConfig(perceptual=perceptual_weight)  # its range, before any work
    rcfg = restorer_config(cfg, lr=restorer_lr, perceptual=restorer_perceptual, adversarial=adversarial_weight)
    if observer is not None and not observer.is_file():
        raise PPFlowerError(f"Observer checkpoint {observer} is not a file (give a classifier's best.pt).")
    device = resolve_device(device)
    lock_out(out or (run_dir / "attack" if run_dir else Path("runs/attack")))  # the default of attack_targets
    attack_targets(transform=transform, run_dir=run_dir, baseline=baseline, key=key, out=out, cfg=cfg, strong=strong,
                   perceptual_weight=perceptual_weight, force=force, data_dir=data_dir, limit_train=limit_train,
                   limit_eval=limit_eval, device=device, log=console.print, vgg_weights=vgg_weights, wire=wire,
                   observer=observer, restorer=rcfg if (strong or restorer) else None)


@app.command()
def protect(
    transform: Path = typer.Option(..., "--transform", help="h_θ checkpoint (a user's best.pt)."),
    input_dir: Path = typer.Argument(..., help="Folder of plain PNG/JPEG images."),
    output_dir: Path = typer.Argument(..., help="Where the protected PNGs go (same file names, .png)."),
    device: str = Device,
):
    """Step (4): turn a folder of plain images into protected images x̂ = h_θ(x) to send to the provider."""
    from pp_flower.evaluation import protect_folder

    n = protect_folder(transform, input_dir, output_dir, resolve_device(device), log=console.print)
    console.print(f"[green]{n} protected images → {output_dir}[/]")


@app.command()
def classify(
    input_dir: Path = typer.Argument(..., help="--classifier: protected PNGs (from `ppflower protect`); --server: "
                                               "plain images, protected here with --transform before sending."),
    classifier: Optional[Path] = typer.Option(None, "--classifier", help="Local: the provider's ψ checkpoint."),
    server: Optional[str] = typer.Option(None, "--server", help="Remote: the URL of `ppflower serve` "
                                                                "(https://host:port)."),
    transform: Optional[Path] = typer.Option(None, "--transform", help="With --server: your h_θ checkpoint; only "
                                                                       "the 8-bit x̂ = h_θ(x) is sent."),
    token_file: Optional[Path] = typer.Option(None, "--token-file", envvar="PPFLOWER_TOKEN_FILE",
                                              help="With --server: a file holding your bearer token."),
    ca_cert: Optional[Path] = typer.Option(None, "--ca-cert", help="With --server: the CA certificate that signed "
                                                                   "the server's (e.g. a self-signed ca.crt)."),
    device: str = Device,
):
    """Step (5): ψ labels protected images; prints one line per image (name, label, and with --server ψ's
    probability). Locally with --classifier, or through the provider's service with --server and --transform."""
    if (classifier is None) == (server is None):
        raise PPFlowerError("Give either --classifier PSI.pt (local ψ) or --server URL --transform H.pt (the "
                            "provider's service).")
    if classifier is not None:
        from pp_flower.evaluation import classify_folder

        for name, label in classify_folder(classifier, input_dir, resolve_device(device)):
            typer.echo(f"{name}\t{label}")
        return
    from pp_flower.serving import classify_remote, read_tokens

    if transform is None:
        raise PPFlowerError("--server needs --transform H.pt: images are protected here before they are sent.")
    token = read_tokens(token_file)[0] if token_file else None
    for name, pred in classify_remote(server, transform, input_dir, token, ca_cert, resolve_device(device)):
        typer.echo(f"{name}\t{pred['name']}\t{pred['probability']:.4f}")


@app.command()
def serve(
    classifier: Path = typer.Option(..., "--classifier", help="ψ's checkpoint (on every node of the cluster)."),
    tokens: Path = typer.Option(..., "--tokens", help="File of bearer tokens, one per line (e.g. "
                                                      "`openssl rand -hex 32 > tokens.txt`)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", min=1, max=65535),
    ssl_certfile: Optional[Path] = typer.Option(None, "--ssl-certfile", help="TLS certificate (PEM); with "
                                                                             "--ssl-keyfile turns HTTPS on."),
    ssl_keyfile: Optional[Path] = typer.Option(None, "--ssl-keyfile", help="TLS private key (PEM)."),
    replicas: int = typer.Option(1, "--replicas", help="Copies of ψ serving in parallel."),
    num_gpus: float = typer.Option(0.0, "--num-gpus", help="GPUs per replica (e.g. 0.5: two replicas a GPU)."),
    cpus_per_replica: float = typer.Option(1.0, "--cpus-per-replica", help="CPU cores per replica (its torch "
                                                                           "threads)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Most images ψ runs at once (dynamic batching)."),
    batch_wait_ms: float = typer.Option(5.0, "--batch-wait-ms", min=0.0, help="How long a batch waits to fill."),
    top_k: int = typer.Option(3, "--top-k", min=1, help="Classes with probabilities returned per image."),
    image_size: int = typer.Option(32, "--image-size", min=1, help="Side of the square images ψ takes."),
    max_images: int = typer.Option(256, "--max-images", help="Most images per request."),
    max_request_mb: float = typer.Option(16.0, "--max-request-mb", help="Largest request body (MiB)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address",
                                              help="Attach to a running Ray cluster "
                                                   "(HOST:PORT or auto) instead of starting one."),
    num_cpus: Optional[int] = typer.Option(None, "--num-cpus", help="Cores of the Ray instance started here "
                                                                    "(default: all)."),
):
    """Step (5) as a service: ψ on Ray Serve behind a FastAPI ingress (POST /v1/classify, GET /v1/info, GET
    /v1/health; API docs at /docs). Runs until Ctrl-C or SIGTERM, then stops everything it started."""
    from pp_flower.serving import read_tokens, token_digest
    from sims.serve import ServeOptions, serve_classifier

    options = ServeOptions(
        host=host, port=port, replicas=replicas, num_gpus=num_gpus, cpus_per_replica=cpus_per_replica,
        batch_size=batch_size, batch_wait_ms=batch_wait_ms, top_k=top_k, image_size=(image_size, image_size),
        max_images=max_images, max_request_bytes=int(max_request_mb * 2**20),
        token_digests=[token_digest(t) for t in read_tokens(tokens)],
        ssl_certfile=str(ssl_certfile) if ssl_certfile else None, ssl_keyfile=str(ssl_keyfile) if ssl_keyfile else None,
        ray_address=ray_address, num_cpus=num_cpus)
    try:
        serve_classifier(classifier, options, log=lambda line: console.print(line, highlight=False))
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: serve_classifier has already stopped what it started
        console.print("service stopped.")


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Where the demo writes everything."),
    data_dir: Optional[Path] = DataDir,
    vgg_weights: Optional[Path] = VggWeights,
    device: str = Device,
):
    """The whole pipeline at CPU scale: ψ → 2 users train h_θ on Flower → ITN-Attack → per-user report."""
    from experiments.demo import run_demo

    lock_out(out)
    run_demo(out, data_dir=data_dir, vgg_weights=vgg_weights, device=resolve_device(device), log=console.print)


@app.command()
def reproduce(
    preset: str = typer.Option("cpu", "--preset", help="cpu: ResNet-20 column at CPU scale (≤ 3 h on 2 cores); "
                                                        "paper: the paper's recipe (200 epochs, full U-Net; a GPU); "
                                                        "smoke: minutes, meaningless numbers."),
    out: Optional[Path] = typer.Option(None, "--out", help="Tables, figures, per-stage JSON (default results/PRESET)."),
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="Checkpoints (default runs/reproduce-PRESET)."),
    data_dir: Optional[Path] = DataDir,
    vgg_weights: Optional[Path] = VggWeights,
    device: str = Device,
    until: str = typer.Option("", "--until", help="Stop after this stage (e.g. psi-resnet20); rerun without it "
                                                  "to go on. Stage names are the keys of OUT/stages.json."),
):
    """Table I and Figs. 5–7: ψ, h_θ per α (through the Flower app), the baselines and the ITN-Attack.

    Every stage is resumable: rerun the same command after an interruption and finished stages are skipped."""
    from experiments.reproduce import reproduce as run_reproduce

    from experiments.reproduce import PRESETS

    if preset in PRESETS:  # (an unknown preset is refused by run_reproduce, before any directory is made)
        lock_out(out or Path("results") / preset)
        lock_out(workdir or Path("runs") / f"reproduce-{preset}", "--workdir")
    result = run_reproduce(preset, out, workdir, data_dir, vgg_weights, resolve_device(device), log=console.print,
                           until=until)
    if result is None:
        return
    console.print(f"[bold green]Table I → {(out or Path('results') / preset) / 'table1.md'}[/] "
                  f"({len(result['rows'])} rows)")


@app.command("deploy-local")
def deploy_local_cmd(
    users: int = typer.Option(2, "--users", help="Number of users, each a real SuperNode process."),
    run_config: str = typer.Option("", "--run-config",
                                   help='App run config in Flower\'s grammar (strings quoted), e.g. '
                                        '\'classifier="runs/classifier/best.pt" epochs=1\'; keys: pyproject.toml '
                                        '[tool.flwr.app.config].'),
    workdir: Path = typer.Option(Path("runs/deploy-local"), "--workdir",
                                 help="Certificates, process logs, the provider's run.json and each user's outputs."),
    insecure: bool = typer.Option(False, "--insecure", help="No TLS, no SuperNode authentication (debugging only)."),
    timeout: float = typer.Option(3600, "--timeout", min=1.0, help="Give up (and stop everything) after this many "
                                                                   "seconds."),
):
    """Flower's Deployment Engine on loopback: SuperLink + N SuperNodes as separate processes, TLS and node
    authentication on, `flwr run` with the run config; results collected, every process stopped at the end."""
    from pp_flower.config import PATH_KEYS, AppConfig, parse_run_config, preflight
    from runtime.deploy_local import deploy_local

    if users < 1:
        raise PPFlowerError(f"--users must be at least 1, got {users}.")
    if timeout != timeout or timeout == float("inf"):
        raise PPFlowerError(f"--timeout must be a finite number of seconds, got {timeout}.")
    overrides = parse_run_config(run_config)
    # paths are the caller's: the ServerApp runs from Flower's installed copy of the app, elsewhere
    overrides.update({k: str(Path(v).expanduser().resolve()) for k, v in overrides.items() if k in PATH_KEYS and v})
    cfg = AppConfig.from_run_config(overrides)
    preflight(cfg)
    result = deploy_local(users, workdir, overrides, secure=not insecure, log=console.print, timeout=timeout,
                          stream=lambda line: console.out(line, highlight=False))
    for name, m in result["users"].items():
        console.print(f"{name}: test accuracy {m['test-accuracy']:.4f}, protected PSNR "
                      f"{m['protected-psnr']['median']:.2f} dB (median)")
    console.print(f"[bold green]provider summary → {result['workdir']}/run/run.json; users' outputs in "
                  f"{result['workdir']}/run/user-K/ (as a simulation's: `ppflower attack --run-dir` reads them)[/]")


@app.command()
def curve(
    classifier: Path = typer.Option(..., "--classifier", help="ψ checkpoint (trained on plain images)."),
    observer: Optional[Path] = typer.Option(None, "--observer", help="An independent classifier of plain images "
                                            "(a second `train-classifier --seed 1`): how recognisable x̂ is."),
    alpha: float = typer.Option(0.005, "--alpha", min=0.0, help="α of L_trans = L_class − α·L_feat."),
    unet_base: int = typer.Option(16, "--unet-base", min=1, help="U-Net width (the authors: 64)."),
    steps: int = typer.Option(3520, "--steps", min=1, help="Steps to train to (352 = one epoch of 45,000 images "
                                                            "at batch 128); a larger value extends a finished curve."),
    eval_every: int = typer.Option(50, "--eval-every", min=1, help="Steps between curve points."),
    eval_images: int = typer.Option(1000, "--eval-images", min=2, help="Fixed validation images per point."),
    max_minutes: float = typer.Option(0.0, "--max-minutes", min=0.0, help="Stop training after this much wall time "
                                                                         "(then a last point; rerun to go on). 0 = "
                                                                         "no limit."),
    lr: float = typer.Option(0.1, "--lr", min=0.0, help="The authors: 0.1 (× 0.2 at epochs 60/120/160 of 200)."),
    batch_size: int = typer.Option(128, "--batch-size", min=1),
    precision: str = typer.Option("auto", "--precision", help="fp32, bf16 (autocast in the training step; "
                                                              "measurements stay fp32), or auto: bf16 where the "
                                                              "hardware has native bf16, else fp32."),
    wire: str = typer.Option("uint8", "--wire", help="What ψ sees in training: uint8 (the 8-bit image, the app's "
                                                     "default) or float32 (x̂ itself)."),
    out: Optional[Path] = typer.Option(None, "--out", help="curve.json and figures [default: results/curve/"
                                                           "a<α>-w<width>]."),
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="Resume point and best h_θ [default: "
                                                                   "runs/curve/a<α>-w<width>]."),
    data_dir: Optional[Path] = DataDir,
    vgg_weights: Optional[Path] = VggWeights,
    device: str = Device,
):
    """h_θ's learning curve with the authors' exact recipe (SGD lr 0.1, batch 128, 200-epoch step schedule), on all
    training images, measured every --eval-every steps: ψ and the observer on x̂, protected PSNR/SSIM, losses,
    saturation, collapse. Resumes when rerun; writes curve.json, fig_curve.png and fig_grid.png."""
    from pp_flower.classifier import bf16_autocast_pays
    from pp_flower.curve import CurveConfig
    from experiments import curve as curve_cmd

    device = resolve_device(device)
    if precision == "auto":
        precision = "bf16" if bf16_autocast_pays(device) else "fp32"
    cfg = CurveConfig(alpha=alpha, unet_base=unet_base, lr=lr, batch_size=batch_size, eval_every=eval_every,
                      eval_images=eval_images, precision=precision, wire=wire)
    name = f"a{alpha:g}-w{unet_base}"
    out, workdir = out or Path("results/curve") / name, workdir or Path("runs/curve") / name
    console.print(f"curve: α = {alpha:g}, width {unet_base}, {steps} steps, {precision} on {device} → {out}")
    result = curve_cmd.run(classifier, observer, cfg, steps, out, workdir, data_dir, vgg_weights, device,
                           log=console.print, max_seconds=60 * max_minutes or None)
    last = result["points"][-1]
    console.print(f"[bold green]step {last['step']}: ψ on x̂ {100 * last['psi-accuracy']:.1f} %, protected PSNR "
                  f"{last['psnr-protected-median']:.2f} dB (median); best h_θ (lowest validation L_trans) at step "
                  f"{result['best-step']} → {workdir}/best.pt; figures → {out}[/]")


def _simulate_command() -> None:
    from runtime.flower_simulation import cli as simulation_cli

    app.command("simulate", help="Step (3): users train h_θ with the provider on Flower's simulation engine "
                                 "(same as the `flower-simulation` command).")(simulation_cli)


_simulate_command()


def main() -> None:
    from runtime import signals
    from runtime.flower_patches import plain_logs_when_piped

    signals.install()  # SIGTERM and SIGHUP interrupt every command as Ctrl-C does (child processes included)
    try:
        plain_logs_when_piped()
        app()
    except PPFlowerError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
        sys.exit(2)
    except OSError as exc:  # e.g. an output directory that cannot be created or written
        if exc.filename is None:
            raise
        err_console.print(f"[bold red]error:[/] cannot write or read {exc.filename}: {exc.strerror}; choose another "
                          "path (nothing else was changed).", markup=True, highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        signals.print_resume_line()
        sys.exit(130)
    except SystemExit as exc:
        # typer turns an interrupt into a silent Exit(130) before the handler above could see it
        if exc.code == 130 and signals.interrupted():
            signals.print_resume_line()
        raise


if __name__ == "__main__":
    main()
