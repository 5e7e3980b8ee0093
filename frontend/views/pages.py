"""Sign-in landing, prompt writing and the guidelines."""

from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.http import Http404
from django.shortcuts import redirect, render

from annotation.models import AnnotatorProfile, Domain, Guideline, Role
from annotation.services.dialogues import prompt_create
from annotation.services.errors import AnnotationError
from annotation.services.review import guideline_save

from ..access import DASHBOARD_ROLES, role_required
from ..forms import GuidelineForm, PromptForm


@role_required()
def home(request):
    """Researchers land on the dashboard, reviewers on the queue, everyone else on the workbench."""
    if request.role in DASHBOARD_ROLES:
        return redirect("frontend:dashboard")
    if request.role == Role.REVIEWER:
        return redirect("frontend:review")
    return redirect("frontend:annotate")


def _domains(user) -> list[str]:
    profile = AnnotatorProfile.objects.filter(user=user).first()
    return profile.domains if profile else ["helpfulness"]


@role_required()
def prompt_write(request):
    """Write a prompt; its first comparison opens when a model worker attaches two responses."""
    domains = _domains(request.user)
    form = PromptForm(request.POST or None, domains=domains)
    if request.method == "POST" and form.is_valid():
        try:
            task = prompt_create(
                author=request.user,
                text=form.cleaned_data["text"],
                domain=form.cleaned_data["domain"],
                risk_category=form.cleaned_data["risk_category"],
            )
        except AnnotationError as error:
            form.add_error(error.field if error.field in form.fields else None, error.message)
        else:
            messages.success(request, f"Prompt saved (comparison {task.id}); it opens when two model replies arrive.")
            return redirect("frontend:prompt-write")
    status = 400 if request.method == "POST" else 200
    return render(request, "frontend/prompt_form.html", {"form": form, "nav": "write"}, status=status)


def rating_scales(domain: str) -> list[tuple[str, list[tuple[int, str]]]]:
    """The evaluation campaigns' scales a rater of this domain meets, with what each point means (the same labels
    the rating page shows)."""
    from annotation.evaluation_results import SCALE_LABELS
    from annotation.models import RatingScale

    own = RatingScale.SAFETY if domain == Domain.SAFETY else RatingScale.HELPFULNESS
    return [(RatingScale(scale).label, sorted(SCALE_LABELS[scale].items()))
            for scale in (own, RatingScale.COMPARATIVE)]  # fmt: skip


@role_required()
def guidelines(request, domain: str = ""):
    """The guidelines of each domain, rendered from Markdown (raw HTML shown as text); admins edit them here."""
    if domain and domain not in Domain.values:
        raise Http404("no such domain")
    if not domain:
        domain = _domains(request.user)[0] if _domains(request.user) else Domain.HELPFULNESS
    guideline = Guideline.objects.filter(domain=domain).first()
    form = None
    if request.role == Role.ADMIN:
        form = GuidelineForm(request.POST or None, initial={"text": guideline.text if guideline else ""})
        if request.method == "POST" and form.is_valid():
            guideline_save(domain=domain, text=form.cleaned_data["text"], user=request.user)
            messages.success(request, f"{domain.capitalize()} guidelines saved.")
            return redirect("frontend:guidelines-domain", domain=domain)
    elif request.method == "POST":
        raise PermissionDenied("only admins edit the guidelines")
    return render(
        request,
        "frontend/guidelines.html",
        {"domain": domain, "domains": Domain.values, "guideline": guideline, "form": form, "nav": "guidelines",
         "scales": rating_scales(domain)},
    )
