from django.contrib.auth import views as auth_views
from django.urls import path

from .views import annotate, campaigns, dashboard, login, pages, review, work

app_name = "frontend"

urlpatterns = [
    path("", pages.home, name="home"),
    path("login/", login.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("annotate/", annotate.annotate_page, name="annotate"),
    path("annotate/next/", annotate.annotate_next, name="annotate-next"),
    path("annotate/<int:task_id>/submit/", annotate.annotate_submit, name="annotate-submit"),
    path("annotate/<int:task_id>/skip/", annotate.annotate_skip, name="annotate-skip"),
    path("annotate/today/", annotate.annotate_history, name="annotate-history"),
    path("annotate/undo/<int:annotation_id>/", annotate.annotate_undo, name="annotate-undo"),
    path("prompts/new/", pages.prompt_write, name="prompt-write"),
    path("guidelines/", pages.guidelines, name="guidelines"),
    path("guidelines/<str:domain>/", pages.guidelines, name="guidelines-domain"),
    path("review/", review.review_queue, name="review"),
    path("review/<int:task_id>/", review.review_task, name="review-task"),
    path("dashboard/", dashboard.dashboard, name="dashboard"),
    path("dashboard/runs/", dashboard.runs_fragment, name="dashboard-runs"),
    path("dashboard/runs/<int:run_id>/cancel/", dashboard.run_cancel, name="run-cancel"),
    path("dashboard/runs/start/", dashboard.run_start, name="run-start"),
    path("dashboard/work/", work.work, name="work"),
    path("dashboard/batches/<int:batch_id>/close/", work.batch_close_view, name="batch-close"),
    path("rate/", campaigns.rate, name="rate"),
    path("rate/<int:item_id>/", campaigns.rate_submit, name="rate-submit"),
    path("dashboard/campaigns/", campaigns.campaigns, name="campaigns"),
    path("dashboard/campaigns/<int:campaign_id>/", campaigns.campaign, name="campaign"),
    path("dashboard/campaigns/<int:campaign_id>/close/", campaigns.campaign_close_view, name="campaign-close"),
]
