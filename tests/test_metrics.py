"""Evaluation metrics on hand-built images whose mIoU / AP / PQ follow by hand, plus oracle
predictions on generated scenes, distributed merge, and per-layer mask consistency."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from mpformer_ray.data.synthetic import SYNTHETIC_CLASSES, generate_scenes
from mpformer_ray.evaluation import Evaluator, MaskConsistency

# two thing classes and one stuff class
CLASSES = [
    {"id": 0, "name": "cat", "isthing": True, "source_id": 1},
    {"id": 1, "name": "dog", "isthing": True, "source_id": 2},
    {"id": 2, "name": "sky", "isthing": False, "source_id": 3},
]
ALL_TASKS = {"semantic", "instance", "panoptic"}
SIZE = 10


def box(y0: int, y1: int, x0: int, x1: int, size: int = SIZE) -> np.ndarray:
    """bool [size, size] mask of rows y0..y1-1, columns x0..x1-1."""
    m = np.zeros((size, size), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def segment(seg_id: int, category: int, mask: np.ndarray, crowd: bool = False) -> dict:
    return {"id": seg_id, "category_id": category, "iscrowd": crowd, "mask": mask}


def record(image_id: int, segments: list[dict], sem_seg: np.ndarray | None = None, size: int = SIZE) -> dict:
    return {"image_id": image_id, "file_name": f"{image_id}.jpg", "image": np.zeros((size, size, 3), np.uint8),
            "segments": segments, "sem_seg": sem_seg}


def scene() -> list[dict]:
    """A (class 0, 16 px) top-left, B (class 1, 16 px) bottom-right, sky (class 2) the other 68 px."""
    a, b = box(0, 4, 0, 4), box(6, 10, 6, 10)
    return [segment(1, 0, a), segment(2, 1, b), segment(3, 2, ~(a | b))]


def predict(segments: list[dict], scores: list[float] | None = None, num_classes: int = 3,
            size: int = SIZE) -> dict:
    """A model output (torch tensors) that predicts exactly ``segments`` (each {"category_id",
    "mask", "isthing"?}; later ones paint over earlier ones in the panoptic map)."""
    scores = scores or [0.9] * len(segments)
    sem = torch.zeros(num_classes, size, size)
    pan = torch.zeros(size, size, dtype=torch.int32)
    info, things = [], []
    for i, (seg, score) in enumerate(zip(segments, scores), start=1):
        mask = torch.from_numpy(seg["mask"])
        sem[:, mask] = 0.0
        sem[seg["category_id"], mask] = 1.0
        pan[mask] = i
        isthing = CLASSES[seg["category_id"]]["isthing"] if num_classes == 3 else seg["isthing"]
        info.append({"id": i, "category_id": seg["category_id"], "isthing": isthing, "score": score})
        if isthing:
            things.append((mask, score, seg["category_id"]))
    instances = {
        "masks": torch.stack([t[0] for t in things]) if things else torch.zeros(0, size, size, dtype=torch.bool),
        "scores": torch.tensor([t[1] for t in things], dtype=torch.float32),
        "labels": torch.tensor([t[2] for t in things], dtype=torch.int64),
    }
    return {"sem_seg": sem, "panoptic": (pan, info), "instances": instances}


def evaluate(records: list[dict], predictions: list[dict], tasks: set[str] = ALL_TASKS) -> dict[str, float]:
    ev = Evaluator(CLASSES, tasks)
    for r, p in zip(records, predictions):
        ev.process(r, p)
    return ev.evaluate()


def test_perfect_prediction_scores_100_everywhere():
    segs = scene()
    m = evaluate([record(1, segs)], [predict(segs)])
    for key in ("sem_seg/mIoU", "sem_seg/pAcc", "segm/AP", "segm/AP50", "segm/AP75", "segm/APs",
                "panoptic/PQ", "panoptic/SQ", "panoptic/RQ", "panoptic/PQ_th", "panoptic/PQ_st"):
        assert m[key] == pytest.approx(100.0), key
    # every object is small (< 32^2 px): COCOeval has no medium / large ground truth to average
    assert math.isnan(m["segm/APm"]) and math.isnan(m["segm/APl"])


def test_false_positive_segment():
    segs = scene()
    fp = segment(4, 0, box(0, 2, 6, 10))  # 8 px of class 0 cut out of the sky, overlapping no cat
    m = evaluate([record(1, segs)], [predict(segs + [fp])])
    # class 0: TP 1 (IoU 1) + FP 1 -> PQ = RQ = 1 / (1 + 1/2) = 2/3, SQ = 1
    # class 1: perfect; class 2 (sky): the FP took 8 of its 68 px -> IoU 60/68, PQ = SQ = 60/68, RQ = 1
    pq = [2 / 3, 1.0, 60 / 68]
    sq = [1.0, 1.0, 60 / 68]
    rq = [2 / 3, 1.0, 1.0]
    assert m["panoptic/PQ"] == pytest.approx(100 * np.mean(pq))
    assert m["panoptic/SQ"] == pytest.approx(100 * np.mean(sq))
    assert m["panoptic/RQ"] == pytest.approx(100 * np.mean(rq))
    assert m["panoptic/PQ_th"] == pytest.approx(100 * np.mean(pq[:2]))
    assert m["panoptic/RQ_th"] == pytest.approx(100 * np.mean(rq[:2]))
    assert m["panoptic/PQ_st"] == pytest.approx(100 * pq[2])


def test_false_positive_detection_ap_depends_on_its_rank():
    segs = scene()
    fp = segment(4, 0, box(0, 2, 6, 10))
    # scored below the true cat: precision is 1 up to recall 1, so AP stays 100
    low = evaluate([record(1, segs)], [predict(segs + [fp], scores=[0.9, 0.9, 0.9, 0.5])], {"instance"})
    assert low["segm/AP"] == pytest.approx(100.0)
    # scored above it: the only cat is found at rank 2, so precision is 1/2 at every recall
    # level for class 0 (AP 50) while class 1 stays 100 -> mean 75 at every IoU threshold
    high = evaluate([record(1, segs)], [predict(segs + [fp], scores=[0.9, 0.9, 0.9, 0.95])], {"instance"})
    for key in ("segm/AP", "segm/AP50", "segm/AP75"):
        assert high[key] == pytest.approx(75.0), key


def test_missed_segment():
    segs = scene()
    a, b, sky = segs
    # the dog is left out: its pixels stay void (id 0) in the panoptic map and get no detection
    m = evaluate([record(1, segs)], [predict([a, sky])])
    # class 1: FN 1, TP 0 -> PQ = SQ = RQ = 0; classes 0 and 2 perfect
    for name in ("PQ", "SQ", "RQ"):
        assert m[f"panoptic/{name}"] == pytest.approx(200 / 3), name
    assert m["panoptic/PQ_th"] == pytest.approx(50.0)
    assert m["panoptic/PQ_st"] == pytest.approx(100.0)
    assert m["segm/AP"] == pytest.approx(50.0)  # cat AP 100, dog AP 0
    # a dog predicted with IoU 1/3 (8 shared px, union 24) does not match: one FN and one FP; it
    # also takes 8 px from the sky (IoU 60/68)
    sky_left = segment(3, 2, sky["mask"] & ~box(2, 10, 8, 10))
    m = evaluate([record(1, segs)], [predict([a, sky_left, segment(2, 1, box(2, 10, 8, 10))])], {"panoptic"})
    assert m["panoptic/PQ"] == pytest.approx(100 * (1 + 0 + 60 / 68) / 3)
    assert m["panoptic/RQ_th"] == pytest.approx(50.0)


def test_ignore_pixels_are_left_out_of_miou():
    gt = np.array([[0, 0, 1, 1], [255, 255, 1, 0]], dtype=np.uint8)
    r = {"image_id": 7, "file_name": "7.png", "image": np.zeros((2, 4, 3), np.uint8), "segments": [], "sem_seg": gt}

    def scores(labels: list[list[int]]) -> np.ndarray:
        return np.eye(3, dtype=np.float32)[np.array(labels)].transpose(2, 0, 1)  # [3, 2, 4] one-hot

    # valid pixels: gt 0 -> pred (0, 1, 0), gt 1 -> pred (1, 1, 1); the two 255 pixels predict 1 and 0
    m = evaluate([r], [{"sem_seg": scores([[0, 1, 1, 1], [1, 0, 1, 0]])}], {"semantic"})
    # IoU0 = 2 / (3 + 2 - 2), IoU1 = 3 / (3 + 4 - 3); class 2 is in neither -> left out
    assert m["sem_seg/mIoU"] == pytest.approx(100 * (2 / 3 + 3 / 4) / 2)
    assert m["sem_seg/pAcc"] == pytest.approx(100 * 5 / 6)
    assert m["sem_seg/mAcc"] == pytest.approx(100 * (2 / 3 + 1) / 2)
    # a class predicted on a valid pixel but absent from the ground truth counts with IoU 0
    m = evaluate([r], [{"sem_seg": scores([[0, 2, 1, 1], [1, 0, 1, 0]])}], {"semantic"})
    assert m["sem_seg/mIoU"] == pytest.approx(100 * (2 / 3 + 1 + 0) / 3)


def test_semantic_ground_truth_from_segments_ignores_crowd_and_uncovered():
    a, crowd = box(0, 4, 0, 4), box(6, 10, 6, 10)
    segs = [segment(1, 0, a), segment(2, 1, crowd, crowd=True), segment(3, 2, box(0, 10, 4, 6))]
    wrong_elsewhere = segs + [segment(4, 2, crowd | (~(a | crowd) & ~box(0, 10, 4, 6)))]
    # prediction: right on every labelled pixel, "sky" on the crowd and the uncovered pixels
    m = evaluate([record(1, segs)], [predict(wrong_elsewhere)], {"semantic"})
    assert m["sem_seg/mIoU"] == pytest.approx(100.0)
    # the same prediction against an explicit label map that does label the crowd region as dog
    sem = np.full((SIZE, SIZE), 255, np.uint8)
    sem[a], sem[crowd], sem[box(0, 10, 4, 6)] = 0, 1, 2
    m = evaluate([record(1, segs, sem_seg=sem)], [predict(wrong_elsewhere)], {"semantic"})
    assert m["sem_seg/mIoU"] == pytest.approx(100 * (1 + 0 + 20 / 36) / 3)


def test_prediction_on_crowd_or_void_is_not_a_false_positive():
    a, crowd = box(0, 4, 0, 4), box(6, 10, 6, 10)
    sky = box(0, 10, 4, 6)  # the rest of the image is void (unlabelled)
    segs = [segment(1, 0, a), segment(2, 0, crowd, crowd=True), segment(3, 2, sky)]
    cat, sky = segs[0], segs[2]
    on_crowd = segment(4, 0, crowd)  # a cat predicted on the cat crowd, scored above the real cat
    on_void = segment(5, 1, box(0, 3, 7, 10))  # a dog entirely on void
    m = evaluate([record(1, segs)], [predict([cat, sky, on_crowd, on_void], scores=[0.5, 0.9, 0.9, 0.9])])
    assert m["panoptic/PQ"] == pytest.approx(100.0)
    assert m["segm/AP"] == pytest.approx(100.0)  # the crowd match is ignored; the dog class has no GT
    # control: a dog on the cat crowd is not excused (crowd of another class) -> dog FP, no dog GT
    # -> dog PQ 0 in the panoptic mean; for AP the dog class has no ground truth and stays out
    m = evaluate([record(1, segs)], [predict([cat, sky, segment(4, 1, crowd)])])
    assert m["panoptic/PQ"] == pytest.approx(100 * 2 / 3)
    assert m["panoptic/PQ_th"] == pytest.approx(50.0)
    # a cat spilling 8 px onto void: void pixels leave the union, so its IoU stays 1 (else 16/24)
    spill = segment(1, 0, a | box(4, 6, 0, 4))
    m = evaluate([record(1, segs)], [predict([spill, sky])], {"panoptic"})
    assert m["panoptic/SQ"] == pytest.approx(100.0)


def test_no_ground_truth_instances_gives_nan_not_an_error():
    sky = segment(1, 2, np.ones((SIZE, SIZE), bool))
    m = evaluate([record(1, [sky])], [predict([sky, segment(2, 0, box(0, 3, 0, 3))])], {"instance"})
    assert all(math.isnan(m[k]) for k in ("segm/AP", "segm/AP50", "segm/APl"))


def scene_records(num: int, size: int = 32) -> list[dict]:
    return [record(i, [segment(j + 1, s["class_id"], s["mask"], s["iscrowd"]) for j, s in enumerate(sc["segments"])],
                   size=size)
            for i, sc in enumerate(generate_scenes(num, size, size, seed=3))]


def oracle(r: dict) -> dict:
    """Perfect prediction of a record (crowd regions left out, as a model would not output them)."""
    segs = [{"category_id": s["category_id"], "mask": s["mask"], "isthing": SYNTHETIC_CLASSES[s["category_id"]]["isthing"]}
            for s in r["segments"] if not s["iscrowd"]]
    return predict(segs, num_classes=len(SYNTHETIC_CLASSES), size=r["image"].shape[0])


def test_oracle_on_generated_scenes_and_merge_equals_single_evaluator():
    classes = [dict(c, source_id=c["id"] + 1) for c in SYNTHETIC_CLASSES]
    records = scene_records(8)
    assert any(s["iscrowd"] for r in records for s in r["segments"]), "the scenes should include a crowd region"
    preds = [oracle(r) for r in records]
    # damage two images so the merged metrics are not trivially 100
    for p in preds[1::4]:
        p["sem_seg"] = p["sem_seg"].flip(-1)
        p["instances"]["masks"] = p["instances"]["masks"].flip(-1)
        p["panoptic"] = (p["panoptic"][0].flip(-1), p["panoptic"][1])

    single = Evaluator(classes, {"panoptic"})
    for r, p in zip(records, preds):
        single.process(r, p)
    workers = [Evaluator(classes, {"panoptic"}) for _ in range(3)]
    for i, (r, p) in enumerate(zip(records, preds)):
        workers[i % 3].process(r, p)
    rank0 = workers[0]
    rank0.merge([pickle.loads(pickle.dumps(w.state())) for w in workers[1:]])

    expected, merged = single.evaluate(), rank0.evaluate()
    assert set(expected) == set(merged)
    for key in expected:
        assert merged[key] == pytest.approx(expected[key], nan_ok=True), key
    # panoptic models also report AP and mIoU, and the damage shows in all three
    assert {"segm/AP", "sem_seg/mIoU", "panoptic/PQ_st"} <= set(merged)
    assert 0 < merged["panoptic/PQ"] < 100 and 0 < merged["sem_seg/mIoU"] < 100 and 0 < merged["segm/AP"] < 100

    perfect = Evaluator(classes, {"panoptic"})
    for r in records:
        perfect.process(r, oracle(r))
    m = perfect.evaluate()
    assert m["panoptic/PQ"] == pytest.approx(100.0) and m["sem_seg/mIoU"] == pytest.approx(100.0)
    assert m["segm/AP"] == pytest.approx(100.0)

    # states hold RLEs and sums, not masks; the same image twice is refused
    assert len(pickle.dumps(workers[1].state())) < sum(r["image"].size for r in records)
    with pytest.raises(ValueError, match="evaluated twice"):
        single.merge([workers[1].state()])


def test_missing_prediction_key_and_wrong_size_name_the_problem():
    segs = scene()
    ev = Evaluator(CLASSES, {"instance"})
    with pytest.raises(ValueError, match="lacks \\['instances'\\]"):
        ev.process(record(1, segs), {"sem_seg": torch.zeros(3, SIZE, SIZE)})
    small = predict(segs)
    small["instances"]["masks"] = small["instances"]["masks"][:, :5]
    with pytest.raises(ValueError, match="original image resolution"):
        ev.process(record(1, segs), small)
    # only semantic requested: a prediction without the other keys is fine, and AP / PQ are not reported
    ev = Evaluator(CLASSES, {"semantic"})
    ev.process(record(1, segs), {"sem_seg": predict(segs)["sem_seg"]})
    assert not any(k.startswith(("segm/", "panoptic/")) for k in ev.evaluate())


def test_mask_consistency():
    left, middle = torch.zeros(3, 4, 4), torch.zeros(3, 4, 4)
    left[:, :, 0:2] = 5.0  # columns 0-1 (8 px)
    middle[:, :, 1:3] = 5.0  # columns 1-2: 4 px shared, union 12 -> IoU 1/3
    disjoint = -left + 1.0  # columns 2-3 positive, 0-1 negative
    garbage = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(0))
    idx = torch.tensor([0, 2])

    same = MaskConsistency(num_layers=2)
    same.update([left, left.clone(), left.clone()], idx)
    assert same.compute() == {"consistency/layer_0_1": 1.0, "consistency/layer_1_2": 1.0, "consistency/mean": 1.0}

    mc = MaskConsistency(num_layers=2)
    layers = [left.clone(), disjoint.clone(), middle.clone()]
    for layer in layers:
        layer[1] = garbage[1]  # query 1 is unmatched and must not count
    mc.update(layers, idx)
    out = mc.compute()
    assert out["consistency/layer_0_1"] == pytest.approx(0.0)
    # columns 2-3 vs 1-2: 4 shared px of 12
    assert out["consistency/layer_1_2"] == pytest.approx(1 / 3)
    assert out["consistency/mean"] == pytest.approx(1 / 6)

    empty = MaskConsistency(num_layers=1)  # a query empty at both layers agrees with itself
    empty.update([-left, -left], torch.tensor([0]))
    assert empty.compute()["consistency/layer_0_1"] == 1.0

    merged = MaskConsistency(num_layers=2)
    merged.merge([same.state(), mc.state()])
    assert merged.compute()["consistency/layer_1_2"] == pytest.approx((1 + 1 / 3) / 2)
    with pytest.raises(ValueError, match="num_layers \\+ 1 = 3"):
        mc.update([left, left], idx)
