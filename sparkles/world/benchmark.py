"""The shapes world as an exactly scored task: fresh BISON-style, NLVR2-style, two-turn dialogue and one-image
caption items whose answers are checked against the scenes (`tasks.score`). Nothing is read from disk: `n` and
`seed` choose the items, and turn 2 of a dialogue is asked after the model's own turn-1 answer.

Captions also score per object: "caption precision" (claimed objects that are in the scene) and "caption recall"
(scene objects the caption names). The summary averages them over items; `data.evaluate_world` sums them over
objects (micro-averaged).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..eval.tasks import LOADERS
from ..eval.tasks.common import Example, Scored


@dataclass(frozen=True)
class ShapesTask:
    items: tuple  # world.Item, in make_eval_set's order
    name: str = "shapes"
    metric: str = "accuracy"
    legacy_name: str = "Shapes"
    by_id: dict = field(default_factory=dict, compare=False)

    def examples(self) -> list[Example]:
        # The canonical answers ride along in the record, for `references`; results never copy the record.
        return [Example(item.id, tuple(_with_sources(m) for m in item.turns),
                        record={"kind": item.kind, "answers": [t.answer for t in item.truths]}) for item in self.items]

    def judge_prompt(self, example: Example, answers) -> None:
        return None

    def references(self, example: Example) -> tuple[str, ...]:
        """The canonical answers of an item, for a ReferenceResponder: they score 1.0 everywhere, which checks the
        scorer and the pipeline end to end."""
        return tuple(example.record["answers"])

    def score(self, example: Example, answers, judgment: Any = None) -> Scored:
        """Each turn right or wrong; parts give the accuracy per task type and, for dialogues, per turn; a caption
        item's parts add its object precision and recall (0 when it claims no object)."""
        from .scoring import object_counts
        from .tasks import score

        item = self.by_id[example.id]
        results = [score(truth, answer) for truth, answer in zip(item.truths, answers)]
        right = [float(bool(r.correct)) for r in results]
        if item.kind == "dialogue":
            parts = {f"dialogue turn {k}": v for k, v in enumerate(right, start=1)}
            parts |= {f"turn_{k}": v for k, v in enumerate(right, start=1)}
        else:
            parts = {item.kind: right[0]}
        if item.kind == "caption":
            matched, claimed, present = object_counts(item.truths[0], answers[0])
            parts |= {"caption precision": matched / claimed if claimed else 0.0,
                      "caption recall": matched / present if present else 0.0}
        found = "; ".join(r.found or "?" for r in results)
        return Scored(sum(right) / len(right), parsed=all(r.found is not None for r in results), prediction=found,
                      parts=parts)

    def legacy_record(self, example: Example, answers, scored: Scored, judgment: Any = None) -> dict[str, Any]:
        item = self.by_id[example.id]
        return {"evaluation_id": example.id, "kind": item.kind, "questions": [m.text for m in item.turns],
                "answers": list(answers), "expected": [t.answer for t in item.truths], "correct": scored.value}


def _with_sources(message):
    """The images as data: URIs too, so results and the report carry them without any file."""
    from dataclasses import replace

    from ..conversation import Image, Message
    from ..image import to_data_uri

    return Message(message.role, tuple(replace(p, source=to_data_uri(p.pixels)) if isinstance(p, Image) else p
                                       for p in message.parts))


def load(root=None, *, n: int = 50, seed: int = 1, grey: bool = False, **options) -> ShapesTask:
    """n items of each type drawn from `seed` (the training streams never use these seeds). With `grey`, every
    image is flat grey: the blind baseline, which a model's accuracy must beat to show that it looks."""
    from .data import blanked
    from .tasks import make_eval_set

    items = tuple(blanked(i) if grey else i for i in make_eval_set(n, seed))
    return ShapesTask(items, by_id={item.id: item for item in items})


LOADERS.register("shapes", lambda root=None, *, n=50, seed=1, grey=False, **options: load(root, n=n, seed=seed,
                                                                                          grey=grey))
