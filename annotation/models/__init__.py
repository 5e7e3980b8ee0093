"""The data model of the Llama 2 preference process. Invariants live in database constraints."""

from .content import Dialogue, Prompt, Response, RiskCategory, Turn, TurnRole
from .evaluation import (
    Campaign,
    CampaignKind,
    CampaignStatus,
    EvaluationAssignment,
    EvaluationItem,
    EvaluationRating,
    ItemStatus,
    RatingScale,
)
from .people import AnnotatorProfile, Role
from .registry import (
    PolicyKind,
    PolicyVersion,
    RewardModelKind,
    RewardModelVersion,
    RunKind,
    RunStatus,
    TrainingRun,
)
from .review import Adjudication, Guideline
from .tasks import (
    Annotation,
    Assignment,
    AssignmentStatus,
    Batch,
    BatchStatus,
    ComparisonTask,
    Domain,
    Split,
    TaskSlot,
    TaskStatus,
)

__all__ = [
    "Campaign",
    "CampaignKind",
    "CampaignStatus",
    "EvaluationAssignment",
    "EvaluationItem",
    "EvaluationRating",
    "ItemStatus",
    "RatingScale",
    "Adjudication",
    "Annotation",
    "AnnotatorProfile",
    "Assignment",
    "AssignmentStatus",
    "Batch",
    "BatchStatus",
    "ComparisonTask",
    "Dialogue",
    "Domain",
    "Guideline",
    "PolicyKind",
    "PolicyVersion",
    "Prompt",
    "Response",
    "RewardModelKind",
    "RewardModelVersion",
    "RiskCategory",
    "Role",
    "RunKind",
    "RunStatus",
    "Split",
    "TaskSlot",
    "TaskStatus",
    "TrainingRun",
    "Turn",
    "TurnRole",
]
