from django.urls import path
from rest_framework.routers import DefaultRouter

from . import views

router = DefaultRouter()
router.register("prompts", views.PromptViewSet, basename="prompt")
router.register("batches", views.BatchViewSet, basename="batch")
router.register("annotations", views.AnnotationViewSet, basename="annotation")
router.register("policies", views.PolicyVersionViewSet, basename="policy")
router.register("reward-models", views.RewardModelVersionViewSet, basename="reward-model")
router.register("training-runs", views.TrainingRunViewSet, basename="training-run")
router.register("campaigns", views.CampaignViewSet, basename="campaign")

batch_stats = views.BatchViewSet.as_view({"get": "stats"})
batch_close = views.BatchViewSet.as_view({"post": "close"})

urlpatterns = [
    path("auth/token/", views.TokenObtainView.as_view(), name="api-token"),
    path("tasks/next/", views.TaskNextView.as_view(), name="task-next"),
    path("tasks/waiting/", views.WaitingTasksView.as_view(), name="task-waiting"),
    path("tasks/<int:task_id>/submit/", views.TaskSubmitView.as_view(), name="task-submit"),
    path("tasks/<int:task_id>/skip/", views.TaskSkipView.as_view(), name="task-skip"),
    path("tasks/<int:task_id>/release/", views.TaskReleaseView.as_view(), name="task-release"),
    path("tasks/<int:task_id>/responses/", views.TaskResponsesView.as_view(), name="task-responses"),
    path("batches/<int:pk>/stats/", batch_stats, name="batch-stats"),
    path("batches/<int:pk>/close/", batch_close, name="batch-close"),
    path("comparisons/import/", views.ImportView.as_view(), name="comparisons-import"),
    path("export/comparisons.jsonl", views.ExportView.as_view(), name="export-comparisons"),
    path("annotators/quality/", views.AnnotatorQualityView.as_view(), name="annotator-quality"),
    path("annotators/me/", views.MyCountsView.as_view(), name="annotator-me"),
    path("backlogs/", views.BacklogsView.as_view(), name="backlogs"),
    path("evaluations/next/", views.EvaluationNextView.as_view(), name="evaluation-next"),
    path("evaluations/<int:item_id>/submit/", views.EvaluationSubmitView.as_view(), name="evaluation-submit"),
    *router.urls,
]
