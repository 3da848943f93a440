"""Did pretraining help? k-NN scores of a run's exported encoder against the same encoder with random
weights, on small image sets that ship inside installed packages (no download), also `spark-evaluate`.

    python -m spark.evaluate runs/spark-pretrain

Two tasks, both scored by k-nearest-neighbour classification (cosine similarity) of the encoder's
global-average-pooled last feature map, each dimension standardized with the reference set's statistics:

* faces: scikit-image's LFW subset (skimage.data.lfw_subset): 100 face and 100 non-face 25 x 25 grayscale
  crops from Labeled Faces in the Wild, upscaled to the run's input size; leave-one-out over the 200
  images, chance 50 %. It is the only labelled photographic set found bundled in an installed package
  (scikit-learn's digits are 8 x 8 drawings; torchvision downloads its data sets); it is small, grayscale
  and unlike the pretraining photographs.
* photo crops, a proxy task built from the embedded photographs (the quick start's pretraining data):
  which photograph does a crop of its right half come from, given crops of the left halves? Chance
  1 / number of photographs. Pretraining saw the whole photographs, right halves included, so this
  measures what the encoder learned about these photographs, not transfer to new images.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from . import checkpoint as ckpt_io
from .data import MEAN, STD, DataError, default_photo_paths, load_rgb

PROG = "spark-evaluate"
RESULT_NAME = "evaluation.json"
CROPS_PER_HALF = 8   # photo-crops task: reference and query crops per photograph
CROP_FRACTION = 0.5  # crop side, as a fraction of the half's shorter side


class EvaluationError(Exception):
    """The run cannot be evaluated; str() is a one-line message for the user."""


def to_input(image: Image.Image, size: int) -> torch.Tensor:
    """An RGB PIL image resized to size x size (bicubic) and normalized like the pretraining data."""
    pixels = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
    x = torch.from_numpy(pixels).permute(2, 0, 1)
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def faces_task(size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of scikit-image's LFW subset: label 1 for the 100 faces, 0 for the 100 non-faces."""
    import skimage.data
    crops = skimage.data.lfw_subset()  # (200, 25, 25) floats in [0, 1]; the first 100 are faces
    images = torch.stack([to_input(Image.fromarray((c * 255).round().astype(np.uint8)), size) for c in crops])
    labels = torch.tensor([1] * 100 + [0] * (len(crops) - 100))
    return images, labels


def random_crops(image: Image.Image, box: Tuple[int, int, int, int], count: int, rng: random.Random
                 ) -> List[Image.Image]:
    left, top, right, bottom = box
    side = int(CROP_FRACTION * min(right - left, bottom - top))
    crops = []
    for _ in range(count):
        x, y = rng.randint(left, right - side), rng.randint(top, bottom - side)
        crops.append(image.crop((x, y, x + side, y + side)))
    return crops


def photo_crops_task(size: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(reference images, labels, query images, labels): crops of the left and right halves of each
    embedded photograph, labelled by photograph."""
    rng = random.Random(seed)
    reference, reference_labels, queries, query_labels = [], [], [], []
    for label, path in enumerate(default_photo_paths()):
        photo = load_rgb(path)
        w, h = photo.size
        for crop in random_crops(photo, (0, 0, w // 2, h), CROPS_PER_HALF, rng):
            reference.append(to_input(crop, size))
            reference_labels.append(label)
        for crop in random_crops(photo, (w - w // 2, 0, w, h), CROPS_PER_HALF, rng):
            queries.append(to_input(crop, size))
            query_labels.append(label)
    return (torch.stack(reference), torch.tensor(reference_labels), torch.stack(queries),
            torch.tensor(query_labels))


@torch.no_grad()
def embed(encoder: torch.nn.Module, images: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """Global-average-pooled last feature map of a timm features_only encoder, in eval mode."""
    encoder.eval()
    return torch.cat([encoder(images[i:i + batch])[-1].mean(dim=(2, 3)) for i in range(0, len(images), batch)])


def knn_accuracy(reference: torch.Tensor, reference_labels: torch.Tensor, queries: Optional[torch.Tensor],
                 query_labels: Optional[torch.Tensor], k: int) -> float:
    """Accuracy of majority-vote k-NN (cosine similarity; ties go to the class of the nearer neighbours).
    Features are standardized per dimension with the reference set's mean and std. queries=None:
    leave-one-out over the reference set."""
    mean, std = reference.mean(0), reference.std(0) + 1e-6
    ref = torch.nn.functional.normalize((reference - mean) / std, dim=1)
    leave_one_out = queries is None
    qry = ref if leave_one_out else torch.nn.functional.normalize((queries - mean) / std, dim=1)
    labels = reference_labels if leave_one_out else query_labels
    similarity = qry @ ref.T
    if leave_one_out:
        similarity.fill_diagonal_(-float("inf"))
    nearest = similarity.topk(k, dim=1).indices                     # (Q, k), nearest first
    votes = torch.zeros(len(qry), int(reference_labels.max()) + 1)
    for rank in range(k):
        # 1 per neighbour, plus a tie-breaking bonus that shrinks with the neighbour's rank
        votes.scatter_add_(1, reference_labels[nearest[:, rank]].unsqueeze(1), torch.full((len(qry), 1),
                                                                                          1 + 1e-3 * (k - rank)))
    return (votes.argmax(1) == labels).float().mean().item()


def load_encoders(run_dir: str, seed: int) -> Tuple[Dict, torch.nn.Module, torch.nn.Module]:
    """(the run's options, its exported encoder, the same architecture with timm's random init)."""
    import timm
    checkpoint = os.path.join(run_dir, ckpt_io.CHECKPOINT_NAME)
    exported = os.path.join(run_dir, "encoder_features.pth")
    if not os.path.isdir(run_dir):
        raise EvaluationError(f"{run_dir}: no such folder")
    for path in (checkpoint, exported):
        if not os.path.isfile(path):
            raise EvaluationError(f"{run_dir}: no {os.path.basename(path)}; is it the --out folder of a finished "
                                  f"spark-pretrain run?")
    try:  # only the options are needed: the encoder of a run of any SparK architecture version is evaluated
        options = torch.load(checkpoint, map_location="cpu", weights_only=True)["args"]
        options["model"], options["input_size"]
    except Exception:  # torch.load raises many types for damaged files; all mean "unusable"
        raise EvaluationError(f"{checkpoint}: not a readable spark-pretrain checkpoint") from None
    pretrained = timm.create_model(options["model"], features_only=True, pretrained=False)
    try:
        pretrained.load_state_dict(torch.load(exported, map_location="cpu", weights_only=True), strict=True)
    except Exception as err:  # torch.load and load_state_dict raise many types; all mean "unusable"
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise EvaluationError(f"{exported}: not loadable into timm's {options['model']}: {reason}") from None
    torch.manual_seed(seed)
    random_init = timm.create_model(options["model"], features_only=True, pretrained=False)
    return options, pretrained, random_init


def evaluate(run_dir: str, input_size: Optional[int] = None, k: int = 5, seed: int = 0) -> Dict:
    options, pretrained, random_init = load_encoders(run_dir, seed)
    size = input_size or int(options["input_size"])
    faces, face_labels = faces_task(size)
    reference, reference_labels, queries, query_labels = photo_crops_task(size, seed)
    result = {"run": run_dir, "model": options["model"], "input_size": size, "k": k, "seed": seed, "tasks": {}}
    tasks = result["tasks"]
    photographs = int(reference_labels.max()) + 1
    tasks["faces"] = {"label": "faces vs non-faces (LFW subset)",
                      "description": "scikit-image's LFW subset, 100 faces and 100 non-faces, leave-one-out",
                      "chance": 0.5}
    tasks["photo_crops"] = {"label": "photo crops (proxy)",
                            "description": f"which of the {photographs} embedded photographs a crop of its right "
                                           f"half comes from, {CROPS_PER_HALF} left-half crops of each as reference",
                            "chance": 1 / photographs}
    for name, encoder in (("pretrained", pretrained), ("random", random_init)):
        tasks["faces"][name] = knn_accuracy(embed(encoder, faces), face_labels, None, None, k)
        tasks["photo_crops"][name] = knn_accuracy(embed(encoder, reference), reference_labels,
                                                  embed(encoder, queries), query_labels, k)
    return result


def report(result: Dict) -> List[str]:
    lines = [f"{result['model']} encoder of {result['run']} against the same encoder with random weights (timm's "
             f"init, seed {result['seed']}): {result['k']}-NN accuracy on pooled last features at "
             f"{result['input_size']} px",
             f"  {'task':<32} {'pretrained':>10} {'random':>7} {'chance':>7}"]
    for task in result["tasks"].values():
        lines.append(f"  {task['label']:<32} {task['pretrained']:>10.3f} {task['random']:>7.3f} "
                     f"{task['chance']:>7.3f}")
    lines += [f"  {task['label']}: {task['description']}" for task in result["tasks"].values()]
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description="k-NN scores of a spark-pretrain run's encoder against "
                                                            "the same encoder with random weights.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the --out folder of a finished spark-pretrain run")
    parser.add_argument("--input-size", type=int, default=None,
                        help="image size fed to the encoder (default: the run's --input-size)")
    parser.add_argument("--k", type=int, default=5, help="neighbours that vote")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random encoder and of the crops")
    args = parser.parse_args(argv)
    if args.k <= 0 or (args.input_size is not None and (args.input_size <= 0 or args.input_size % 32)):
        print(f"{PROG}: error: --k must be positive and --input-size a positive multiple of 32", file=sys.stderr)
        return 2
    try:
        result = evaluate(args.run_dir, args.input_size, args.k, args.seed)
    except EvaluationError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except DataError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    for line in report(result):
        print(line)
    path = os.path.join(args.run_dir, RESULT_NAME)
    ckpt_io.atomic_write(path, lambda f: f.write((json.dumps(result, indent=1) + "\n").encode()))
    print(f"{PROG}: written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
