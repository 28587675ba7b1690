"""FID/KID and CLIP score (ldm.metrics, ``python -m ldm.eval fid|clip-score``) and LPIPS in ``recon``, with tiny
random networks saved as local files: nothing is downloaded."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from ldm.cli.common import format_parameters, save_png
from ldm.eval import cli
from ldm.metrics import clip_score, fid_kid, inception_features, load_clip

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "ldm" / "assets" / "demo" / "shapes.safetensors"


class TinyFeatures(nn.Module):
    """A stand-in for the inception: images [B, 3, H, W] (uint8 or [0, 1]) -> [B, 8] features."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, stride=2)

    def forward(self, x):
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        return self.conv(x).mean((2, 3))


def _features(model, images):
    return model((((images + 1) / 2).clamp(0, 1) * 255).to(torch.uint8)).detach().double().numpy()


def _frechet(a: np.ndarray, b: np.ndarray) -> float:
    """|mu_a - mu_b|^2 + Tr(C_a + C_b - 2 (C_a C_b)^(1/2)); the trace of the root is the sum of the roots of the
    eigenvalues of C_a C_b."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_trace = np.sqrt(np.linalg.eigvals(cov_a @ cov_b).real.clip(min=0)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b) - 2 * root_trace)


def test_fid_is_the_frechet_distance_of_the_features_and_zero_for_the_same_set():
    g = torch.Generator().manual_seed(0)
    real = torch.rand(24, 3, 32, 32, generator=g) * 2 - 1
    fake = (real * 0.5 + 0.3 + 0.1 * torch.randn(real.shape, generator=g)).clamp(-1, 1)
    feature = TinyFeatures()
    same = fid_kid([real[:12], real[12:]], [real], feature, kid_subset_size=8)
    assert abs(same["fid"]) < 1e-3 and abs(same["kid_mean"]) < 1e-3
    out = fid_kid([real], [fake[:10], fake[10:]], feature, kid_subset_size=8)
    expected = _frechet(_features(feature, real), _features(feature, fake))
    assert out["fid"] == pytest.approx(expected, rel=1e-3)
    assert out["kid_mean"] > 0 and (out["num_real"], out["num_fake"]) == (24, 24)
    with pytest.raises(ValueError, match="at least 2 real and 2 generated"):
        fid_kid([real], [fake[:1]], feature)


def test_inception_weights_must_be_a_local_file(tmp_path):
    with pytest.raises(ValueError, match="inception weights not found: .*pt_inception-2015-12-05"):
        inception_features(tmp_path / "nope.pth")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    import open_clip

    from ldm.models.text_encoder import register_text_archs

    register_text_archs()  # the project's tiny open_clip architectures
    torch.manual_seed(0)
    model = open_clip.create_model("ldm-tiny-text", pretrained=None)
    path = tmp_path_factory.mktemp("clip") / "tiny_clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


def test_clip_score_is_100_times_the_clamped_cosine(tiny_clip):
    import open_clip

    model = load_clip("ldm-tiny-text", tiny_clip)
    images = torch.rand(3, 3, 48, 40) * 2 - 1
    prompts = ["a red circle", "two blue squares", "a green triangle"]
    scores = clip_score(images, prompts, model)
    # by hand: resize the shorter side to 32, center crop, normalize, cosine of the two embeddings
    x = torch.nn.functional.interpolate((images + 1) / 2, size=(38, 32), mode="bicubic", align_corners=False,
                                        antialias=True).clamp(0, 1)[..., 3:35, :]
    x = (x - torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)) / \
        torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    cos = torch.nn.functional.cosine_similarity(model.encode_image(x), model.encode_text(open_clip.tokenize(prompts)))
    torch.testing.assert_close(scores, 100 * cos.clamp(min=0).detach(), atol=1e-4, rtol=1e-4)


def test_clip_weights_of_another_architecture_are_one_line(tiny_clip, tmp_path):
    with pytest.raises(ValueError, match="unknown open_clip architecture 'ViT-Q-99'"):
        load_clip("ViT-Q-99", tiny_clip)
    with pytest.raises(ValueError) as info:
        load_clip("ldm-small-text", tiny_clip)
    assert "tiny_clip.safetensors" in str(info.value) and "\n" not in str(info.value)


def _write_pngs(folder: Path, n: int, prompt_of=lambda i: f"picture {i}") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        image = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
        paths.append(save_png(image, folder / f"{i:05d}.png", format_parameters({"prompt": prompt_of(i), "steps": 2})))
    return paths


def test_clip_score_command_reads_the_prompts_from_the_png_metadata(tiny_clip, tmp_path):
    _write_pngs(tmp_path / "samples", 3, lambda i: ["a red circle", "two blue squares", "a green triangle"][i])
    report = cli.main(["clip-score", "--images", str(tmp_path / "samples"), "--clip-arch", "ldm-tiny-text",
                       "--clip-weights", str(tiny_clip), "--out", str(tmp_path / "clip.json")])
    assert report["num_images"] == 3 and 0 <= report["clip_score"] <= 100
    assert set(report["per_image"]) == {"00000.png", "00001.png", "00002.png"}
    assert (tmp_path / "clip.json").is_file()
    (tmp_path / "prompts.txt").write_text("one\ntwo\n")
    with pytest.raises(SystemExit, match="--prompts has 2 prompts for 3 images"):
        cli.main(["clip-score", "--images", str(tmp_path / "samples"), "--prompts", str(tmp_path / "prompts.txt"),
                  "--clip-arch", "ldm-tiny-text", "--clip-weights", str(tiny_clip)])
    with pytest.raises(SystemExit, match="CLIP weights not found"):
        cli.main(["clip-score", "--images", str(tmp_path / "samples"), "--clip-arch", "ldm-tiny-text",
                  "--clip-weights", str(tmp_path / "nope.safetensors")])


def test_fid_command_on_two_folders(tmp_path, monkeypatch):
    import ldm.metrics

    monkeypatch.setattr(ldm.metrics, "inception_features", lambda weights: TinyFeatures())
    _write_pngs(tmp_path / "real", 6)
    _write_pngs(tmp_path / "fake", 5)
    report = cli.main(["fid", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"),
                       "--inception-weights", "unused", "--batch-size", "4", "--kid-subset-size", "4"])
    assert report["num_real"] == 6 and report["num_fake"] == 5 and report["fid"] > 0
    with pytest.raises(SystemExit, match="--fake .*: no such folder"):
        cli.main(["fid", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "nope"),
                  "--inception-weights", "unused"])


def test_recon_reports_lpips_with_local_weights(tmp_path):
    import torchvision

    torch.manual_seed(1)
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    save_file({f"features.{k}": v for k, v in features.state_dict().items()}, tmp_path / "vgg16.safetensors")
    report = cli.main(["recon", "--ckpt", str(DEMO), "--num", "4", "--batch-size", "4",
                       "--lpips-weights", str(tmp_path / "vgg16.safetensors")])
    assert report["lpips"] >= 0 and report["psnr"] > 20
    with pytest.raises(SystemExit, match="python -m ldm.eval: error: .*"):
        cli.main(["recon", "--ckpt", str(DEMO), "--num", "4", "--lpips-weights", str(tmp_path / "nope.pth")])


def test_image_logger_logs_the_clip_score_of_its_grid(tiny_clip, tmp_path):
    from types import SimpleNamespace

    from ldm.training.callbacks import ImageLogger

    with pytest.raises(ValueError, match="clip_weights .*nope.safetensors not found"):
        ImageLogger(clip_weights=str(tmp_path / "nope.safetensors"))
    images = torch.rand(2, 3, 32, 32)
    prompts = ["a red circle", "two blue squares"]

    class Module:  # what the logger needs of a SamplingModule
        validation_prompts = prompts

        def sample_images(self, prompts=None, **kwargs):
            return images

    logged = []
    trainer = SimpleNamespace(global_step=7, is_global_zero=True, default_root_dir=str(tmp_path),
                              logger=SimpleNamespace(log_metrics=lambda metrics, step: logged.append((metrics, step))))
    ImageLogger(clip_weights=str(tiny_clip), clip_arch="ldm-tiny-text").log_images(trainer, Module())
    expected = clip_score(images, prompts, load_clip("ldm-tiny-text", tiny_clip), value_range=(0, 1)).mean().item()
    assert len(logged) == 1 and logged[0][1] == 7
    assert logged[0][0]["val/clip_score"] == pytest.approx(expected)
    assert (tmp_path / "images" / "step-00000007.png").is_file()
