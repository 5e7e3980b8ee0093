import math

from django import forms
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth.forms import AuthenticationForm

from annotation.models import RiskCategory
from annotation.scales import SAFETY_TEXT, STRENGTH_TEXT
from annotation.services.errors import InvalidInput
from annotation.throttling import login_attempt_begin, login_attempt_succeeded
from annotation.validation import MAX_MESSAGE_CHARS, check_text, parse_json

DOMAINS = [("helpfulness", "Helpfulness"), ("safety", "Safety")]
STRENGTHS = [(s.value, text) for s, text in STRENGTH_TEXT.items()]
SAFETY = [("", "— (helpfulness task)"), *[(s.value, text) for s, text in SAFETY_TEXT.items()]]


class CheckedTextField(forms.CharField):
    """Text refused as the API and the importers refuse it (annotation.validation), with their message."""

    def __init__(self, *, name: str, **kwargs):
        super().__init__(**kwargs)
        self.name = name  # the API's name of the field, for the same message

    def to_python(self, value):
        if value not in self.empty_values:
            try:
                check_text(value, field=self.name, max_length=self.max_length)
            except InvalidInput as e:
                raise forms.ValidationError(e.message, code="invalid") from None
        return super().to_python(value)


class PromptForm(forms.Form):
    """Shape only; the domain and risk-category rules are the service's (prompt_create)."""

    domain = forms.ChoiceField(choices=DOMAINS, widget=forms.Select(attrs={"autofocus": True}))
    risk_category = forms.ChoiceField(
        choices=[("", "— (helpfulness prompt)"), *[(v, label) for v, label in RiskCategory.choices if v != "uncategorized"]],
        required=False,
        help_text="Safety prompts only.",
    )
    text = CheckedTextField(name="text", widget=forms.Textarea(attrs={"rows": 6}), max_length=MAX_MESSAGE_CHARS, label="Prompt")

    def __init__(self, *args, domains: list[str], **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["domain"].choices = [(v, label) for v, label in DOMAINS if v in domains]


class AdjudicationForm(forms.Form):
    choice = forms.ChoiceField(choices=[("a", "Response A"), ("b", "Response B")], widget=forms.RadioSelect)
    strength = forms.ChoiceField(choices=STRENGTHS, widget=forms.RadioSelect)
    safety_label = forms.ChoiceField(choices=SAFETY, required=False, label="Safety")
    reason = forms.CharField(widget=forms.Textarea(attrs={"rows": 3}), max_length=10_000)


class GuidelineForm(forms.Form):
    text = forms.CharField(widget=forms.Textarea(attrs={"rows": 20}), label="Guidelines (Markdown)")


class ThrottledLoginMixin:
    """Log-in forms counted against the failed log-ins of the user name and the client address
    (annotation.throttling): past the limit the form refuses, the right password included, until the
    window ends."""

    throttled_message = "Too many failed log-ins for this user name or from this address; try again in %(minutes)s min."

    def clean(self):
        username, password = self.cleaned_data.get("username"), self.cleaned_data.get("password")
        if not (username and password):
            return super().clean()  # nothing to check: the missing field says so
        attempt = login_attempt_begin(self.request, username)
        if attempt.refused_for is not None:
            raise forms.ValidationError(
                self.throttled_message, code="throttled", params={"minutes": math.ceil(attempt.refused_for / 60)}
            )
        cleaned = super().clean()  # raises on a wrong password
        login_attempt_succeeded(attempt)
        return cleaned


class LoginForm(ThrottledLoginMixin, AuthenticationForm):
    pass


class AdminLoginForm(ThrottledLoginMixin, AdminAuthenticationForm):
    pass


RUN_KINDS = [("reward_model", "Reward model"), ("sft", "SFT"), ("rejection_sampling", "Rejection sampling"),
             ("ppo", "PPO"), ("distillation", "Context distillation"), ("generation", "Generation (model worker)"),
             ("evaluation", "Evaluation"), ("round", "A whole round")]  # fmt: skip


class JSONObjectField(forms.CharField):
    def to_python(self, value):
        value = super().to_python(value)
        if not value:
            return {}
        try:
            parsed = parse_json(value, what="params")  # strict: no NaN, bounded nesting
        except InvalidInput as e:
            raise forms.ValidationError(e.message) from None
        if not isinstance(parsed, dict):
            raise forms.ValidationError("params must be a JSON object, e.g. {\"iterations\": 20}")
        return parsed


class RunStartForm(forms.Form):
    """Any kind of run, with its parameters as the API takes them (checked by annotation.services.runs)."""

    kind = forms.ChoiceField(choices=RUN_KINDS)
    params = JSONObjectField(required=False, max_length=20_000, widget=forms.Textarea(attrs={"rows": 4}))


class RoundStartForm(forms.Form):
    """One round of the process: the batches it closes and learns from, and the next batch's prompts."""

    batches = forms.MultipleChoiceField(choices=[], widget=forms.CheckboxSelectMultiple)
    name = forms.CharField(required=False, max_length=100, help_text="the new policy version (default RLHF-V<n>)")
    ppo_iterations = forms.IntegerField(required=False, min_value=1, help_text="run PPO after rejection sampling")
    next_prompts = forms.CharField(required=False, max_length=500, help_text="prompts file of the next batch")
    next_batch = forms.CharField(required=False, max_length=100)

    def __init__(self, *args, batch_names: list[str], **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["batches"].choices = [(n, n) for n in batch_names]

    def clean(self):
        data = super().clean()
        if bool(data.get("next_prompts")) != bool(data.get("next_batch")):
            raise forms.ValidationError("give the next batch's prompts file and its name together")
        return data

    def params(self) -> dict:
        d = self.cleaned_data
        params: dict = {"batches": d["batches"]}
        if d.get("name"):
            params["name"] = d["name"]
        if d.get("ppo_iterations"):
            params["ppo"] = {"iterations": d["ppo_iterations"]}
        if d.get("next_prompts"):
            params["generation"] = {"prompts": d["next_prompts"], "batch": d["next_batch"]}
        return params


class CampaignForm(forms.Form):
    """A human-evaluation campaign: prompts (an uploaded prompts file, or its lines pasted) and one or two versions."""

    name = forms.CharField(max_length=100)
    kind = forms.ChoiceField(choices=[("pairwise", "Compare two policies (7-point, win / tie / loss)"),
                                      ("rating", "Rate one policy (helpfulness 1-7, safety 1-5)")])  # fmt: skip
    policy = forms.ChoiceField(choices=[], help_text="the version under evaluation")
    baseline = forms.ChoiceField(choices=[], required=False, help_text="pairwise: the version it is compared with")
    overlap = forms.IntegerField(min_value=1, max_value=20, initial=3, help_text="raters an item (the report used 3)")
    prompts_file = forms.FileField(required=False)
    prompts_text = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 4}), max_length=2_000_000)

    def __init__(self, *args, policies: list[str], **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["policy"].choices = [(p, p) for p in policies]
        self.fields["baseline"].choices = [("", "—"), *[(p, p) for p in policies]]

    def clean(self):
        data = super().clean()
        if not data.get("prompts_file") and not (data.get("prompts_text") or "").strip():
            raise forms.ValidationError("give the prompts: upload a prompts file or paste its lines")
        return data


class BatchCreateForm(forms.Form):
    """A new batch: comparisons imported from a file, or prompts answered by the model worker; or only the prompts
    already waiting for responses, answered."""

    source = forms.ChoiceField(choices=[("import", "Import a preference file"),
                                        ("prompts", "A prompts file, answered by a policy"),
                                        ("pending", "Answer the prompts waiting for responses")])  # fmt: skip
    name = forms.CharField(max_length=100, required=False)
    overlap = forms.IntegerField(min_value=1, max_value=20, initial=1)
    test_size = forms.IntegerField(min_value=0, max_value=100_000, initial=1000)
    file = forms.FileField(required=False)
    format = forms.ChoiceField(choices=[("native", "native"), ("hh-rlhf", "HH-RLHF"), ("oasst", "Open-Assistant trees"),
                                        ("pandalm", "PandaLM")], required=False)  # fmt: skip
    domain = forms.ChoiceField(choices=DOMAINS, required=False)
    policy = forms.CharField(max_length=100, required=False, help_text="default: the current policy")

    def clean(self):
        data = super().clean()
        source = data.get("source")
        if source in ("import", "prompts"):
            if not data.get("name"):
                self.add_error("name", "name the new batch")
            if not data.get("file"):
                self.add_error("file", "upload the file")
        if source == "import" and (not data.get("format") or not data.get("domain")):
            raise forms.ValidationError("an import needs the file's format and domain")
        return data
