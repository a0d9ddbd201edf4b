"""The three PromptKD protocols on tiny synthetic folders: ImageNet-variant readers (V2 numeric
folders, the 200-class index mapping of -A/-R), all-class evaluation of a bundle through that
mapping, and cross-dataset distillation (target names re-encoded through the teacher's text side)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from models.backbone import load_backbone
from models.bundle import load_bundle
from models.class_vectors import encode_class_names
from models.towers import build_towers
from models.zeroshot import zeroshot_bundle
from promptdistill.cli import main
from training.benchmark import load_benchmark
from training.config import DataCfg
from training.data import build_transform
from training.evaluate import predict
from training.teacher import load_teacher

TINY = Path(__file__).resolve().parents[2] / "models" / "configs" / "tiny-clip.json"
WNIDS = [f"n0{i:07d}" for i in range(12)]
NAMES = [f"thing_{i}" for i in range(12)]  # underscores: the readers must turn them into spaces


def _photo(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).byte().numpy()).save(path)


@pytest.fixture()
def classnames(tmp_path: Path) -> Path:
    f = tmp_path / "classnames.txt"
    f.write_text("".join(f"{w} {n}\n" for w, n in zip(WNIDS, NAMES, strict=True)))
    return f


def test_imagenet_v2_numeric_folders_keep_imagenet_ids(tmp_path: Path, classnames: Path) -> None:
    root = tmp_path / "imagenetv2"
    for i in range(12):
        _photo(root / str(i) / "a.jpeg", i)
    bench = load_benchmark(DataCfg(kind="imagenet_variant", variant="v2", root=root, classnames_file=classnames))
    assert bench.class_names == [n.replace("_", " ") for n in NAMES]
    assert bench.source_ids == list(range(12)) and bench.source_size == 12
    by_folder = {int(r.path.parent.name): y for r, y in zip(bench.test_items, bench.test_labels, strict=True)}  # type: ignore[union-attr]
    assert by_folder == {i: i for i in range(12)}  # "10" and "11" are ids 10, 11 (not sorted as strings)


@pytest.mark.parametrize("variant", ["a", "r"])
def test_imagenet_a_r_subset_and_index_mapping(tmp_path: Path, classnames: Path, variant: str) -> None:
    root = tmp_path / f"imagenet-{variant}"
    subset = [WNIDS[i] for i in (9, 2, 5, 11)]  # created out of order
    for j, w in enumerate(subset):
        _photo(root / w / "x.jpg", j)
    (root / "README.txt").write_text("ignored")
    bench = load_benchmark(DataCfg(kind="imagenet_variant", variant=variant, root=root, classnames_file=classnames))
    assert bench.source_ids == [2, 5, 9, 11]  # sorted folders -> their ImageNet ids
    assert bench.class_names == ["thing 2", "thing 5", "thing 9", "thing 11"]
    assert sorted(set(bench.test_labels)) == [0, 1, 2, 3]


def test_all_class_evaluation_of_an_imagenet_bundle_uses_the_index_mapping(tmp_path: Path, classnames: Path) -> None:
    torch.manual_seed(0)
    bb = load_backbone(str(TINY))
    # duplicate names in the source (ImageNet has some): rows must come by id, not by name
    names = [n.replace("_", " ") for n in NAMES]
    names[5] = names[9] = "crane"
    bundle = zeroshot_bundle(bb, names, ["a photo of a {}."], progress=False)
    from models.bundle import save_bundle

    save_bundle(bundle, tmp_path / "bundle")
    root = tmp_path / "imagenet-a"
    for j, w in enumerate(WNIDS[i] for i in (2, 5, 9, 11)):
        for k in range(3):
            _photo(root / w / f"{k}.jpg", 10 * j + k)
    cfg = tmp_path / "a.yaml"
    cfg.write_text(
        f"protocol: domain_generalization\ndata:\n  kind: imagenet_variant\n  variant: a\n  root: {root}\n"
        f"  classnames_file: {classnames}\n"
    )
    out = tmp_path / "result.json"
    assert main(["evaluate", "--bundle", str(tmp_path / "bundle"), "--config", str(cfg), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["protocol"] == "all" and result["n_classes"] == 4 and set(result) >= {"accuracy"}
    # independent: rows 2, 5, 9, 11 of the bundle, argmax per image
    loaded = load_bundle(tmp_path / "bundle")
    tower, _ = build_towers(loaded)
    bench = load_benchmark(DataCfg(kind="imagenet_variant", variant="a", root=root, classnames_file=classnames))
    rows = loaded.class_vectors["default"][[2, 5, 9, 11]]
    tf = build_transform(loaded.manifest.image_encoder.preprocess.to_config(), train=False)
    logits, labels = predict(lambda x: tower(x) @ rows.t(), bench.dataset("test", "all", tf))
    assert result["accuracy"] == pytest.approx(float((logits.argmax(-1) == labels).float().mean() * 100))


@pytest.mark.slow
def test_cross_dataset_distillation_reencodes_target_names(tmp_path: Path, tiny_config: Path) -> None:
    from tests.training.test_convert import _checkpoint

    ckpt = tmp_path / "model.pth.tar-20"
    _checkpoint(ckpt, 64, 64)
    source = tmp_path / "source_names.txt"
    source.write_text("tench\ngoldfish\nshark\n")  # the "ImageNet" teacher's classes
    assert main(["convert", "promptkd-teacher", str(ckpt), "--classnames", str(source), "--n-base", "3",
                 "--out", str(tmp_path / "teacher"), "--backbone", str(TINY), "--pretrained", "none"]) == 0  # fmt: skip
    data = tmp_path / "target"
    for part in ("train", "test"):
        for c, folder in enumerate(["apple_pie", "ankle_boot", "bee"]):
            for k in range(4):
                _photo(data / part / folder / f"{k}.png", 100 * c + k + (50 if part == "test" else 0))
    sets = ["protocol=cross_dataset", f"teacher_dir={tmp_path / 'teacher'}", f"student.name={tiny_config}",
            "data.kind=image_folder", f"data.root={data}", "distill.vision_depth=2", "optim.epochs=1",
            "loop.progress=false", "data.batch_size=4", "data.crop_scale_min=0.5", "distill.kd_weight=10"]  # fmt: skip
    args = [a for s in sets for a in ("--set", s)]
    assert main(["train", "distill", *args, "--out", str(tmp_path / "student")]) == 0
    results = json.loads((tmp_path / "student" / "results.json").read_text())
    assert results["protocol"] == "cross_dataset"
    assert "accuracy" in results["last"] and "hm" not in results["last"]
    bundle = load_bundle(tmp_path / "student" / "bundle")
    classes = bundle.label_set().classes
    assert [c.name for c in classes] == ["ankle boot", "apple pie", "bee"]
    assert {c.provenance for c in classes} == {"promptkd:cross"}
    teacher = load_teacher(tmp_path / "teacher")
    want = encode_class_names(teacher.text_encoder, ["ankle boot", "apple pie", "bee"], ["{}."])
    assert torch.allclose(bundle.class_vectors["default"], want, atol=1e-5)
    # `evaluate` on the target reports the protocol's metric
    cfg = tmp_path / "target.yaml"
    cfg.write_text(f"protocol: cross_dataset\ndata:\n  kind: image_folder\n  root: {data}\n")
    out = tmp_path / "eval.json"
    assert (
        main(["evaluate", "--bundle", str(tmp_path / "student" / "bundle"), "--config", str(cfg), "--out", str(out)])
        == 0
    )
    assert json.loads(out.read_text())["accuracy"] == pytest.approx(results["last"]["accuracy"])


def test_shipped_protocol_configs_validate() -> None:
    from training.bundle_eval import EvalRunConfig
    from training.config import load_config, read_config_file
    from training.distill import DistillRunConfig
    from training.teacher import TeacherRunConfig

    configs = Path(__file__).resolve().parents[2] / "training" / "configs" / "promptkd"
    teacher = load_config(TeacherRunConfig, configs / "teacher_cross.yaml", ["data.root=/d", "data.split_file=/d/s"])
    assert teacher.classes == "all" and teacher.data.shots == 16
    assert (teacher.promptsrc.text_depth, teacher.promptsrc.vision_depth) == (3, 3)
    cross = sorted(p for p in (configs / "cross").glob("*.yaml") if not p.name.startswith("_"))
    assert len(cross) == 11  # 10 targets + the ImageNet source student for domain generalisation
    for path in cross:
        cfg = load_config(DistillRunConfig, path)
        assert cfg.protocol == "cross_dataset" and cfg.distill.vision_depth == 3 and cfg.distill.kd_weight == 1000
        assert cfg.data.shots == 0 and str(cfg.teacher_dir) == "runs/teacher/imagenet_all"
        same = load_config(DistillRunConfig, configs / path.name)  # the base-to-novel file of that dataset
        assert (cfg.data.kind, cfg.data.root, cfg.data.split_file) == (
            same.data.kind,
            same.data.root,
            same.data.split_file,
        )
    variants = {p.stem: read_config_file(p) for p in (configs / "dg").glob("*.yaml")}
    assert {v["data"]["variant"] for v in variants.values()} == {"v2", "sketch", "a", "r"}
    for raw in variants.values():
        assert raw["protocol"] == "domain_generalization"
        EvalRunConfig.model_validate({"bundle": "b", "data": raw["data"], "protocol": "all"})


def test_summarize_cross_dataset_results(tmp_path: Path) -> None:
    files = []
    for seed, acc in ((1, 60.0), (2, 64.0), (3, 62.0)):
        f = tmp_path / f"seed{seed}.json"
        f.write_text(json.dumps({"last": {"accuracy": acc, "epoch": 20}, "best": {"accuracy": acc + 1, "epoch": 5}}))
        files.append(str(f))
    out = tmp_path / "summary.json"
    assert main(["evaluate", "--summarize", *files, "--out", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["last"]["accuracy"]["mean"] == pytest.approx(62.0) and summary["last"]["accuracy"]["std"] == 2.0
    assert summary["best"]["accuracy"]["mean"] == pytest.approx(63.0)


def test_zero_shot_bundle_can_teach_and_a_student_bundle_cannot(tmp_path: Path) -> None:
    from models.bundle import save_bundle

    torch.manual_seed(0)
    bb = load_backbone(str(TINY))
    save_bundle(zeroshot_bundle(bb, ["cat", "dog", "bee"], ["a photo of a {}."], progress=False), tmp_path / "zs")
    teacher = load_teacher(tmp_path / "zs")  # the paper's "zero-shot CLIP teacher" ablation
    assert teacher.class_names == ["cat", "dog", "bee"] and teacher.class_vectors.shape == (3, 64)
    from models.heads import Projector, ProjectorCfg
    from models.prompts import PromptedImageEncoder, PromptedTextEncoder
    from training.export import ImageParts, TextParts, assemble_bundle, label_set, write_bundle

    image = ImageParts(bb, PromptedImageEncoder(bb.model), Projector(ProjectorCfg(64, 64)), key="student")
    text = TextParts(bb, PromptedTextEncoder(bb.model, bb.tokenizer), ["a photo of a {}."], key="student")
    student = assemble_bundle(image, {"default": teacher.class_vectors}, [label_set("default", teacher.class_names)],
                              text=text)  # fmt: skip
    write_bundle(student, tmp_path / "student")
    with pytest.raises(ValueError, match="has a projector"):
        load_teacher(tmp_path / "student")
