"""The shapes world as an exactly scored task: fresh BISON-style, NLVR2-style and two-turn dialogue items whose
answers are checked against the scenes (`tasks.score`). Nothing is read from disk: `n` and `seed` choose the items,
and turn 2 of a dialogue is asked after the model's own turn-1 answer.
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
        return [Example(item.id, tuple(_with_sources(m) for m in item.turns), record={"kind": item.kind})
                for item in self.items]

    def judge_prompt(self, example: Example, answers) -> None:
        return None

    def score(self, example: Example, answers, judgment: Any = None) -> Scored:
        """Each turn right or wrong; parts give the accuracy per task type and, for dialogues, per turn."""
        from .tasks import score

        item = self.by_id[example.id]
        results = [score(truth, answer) for truth, answer in zip(item.truths, answers)]
        right = [float(bool(r.correct)) for r in results]
        if item.kind == "dialogue":
            parts = {f"dialogue turn {k}": v for k, v in enumerate(right, start=1)}
            parts |= {f"turn_{k}": v for k, v in enumerate(right, start=1)}
        else:
            parts = {item.kind: right[0]}
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


def load(root=None, *, n: int = 50, seed: int = 1, **options) -> ShapesTask:
    """n items of each type drawn from `seed` (the training streams never use these seeds)."""
    from .tasks import make_eval_set

    items = tuple(make_eval_set(n, seed))
    return ShapesTask(items, by_id={item.id: item for item in items})


LOADERS.register("shapes", lambda root=None, *, n=50, seed=1, **options: load(root, n=n, seed=seed))
