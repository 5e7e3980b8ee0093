import math

from django import forms
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth.forms import AuthenticationForm

from annotation.models import RiskCategory
from annotation.scales import SafetyLabel, Strength
from annotation.services.errors import InvalidInput
from annotation.throttling import login_attempt_begin, login_attempt_succeeded
from annotation.validation import MAX_MESSAGE_CHARS, check_text

DOMAINS = [("helpfulness", "Helpfulness"), ("safety", "Safety")]
STRENGTHS = [
    (Strength.SIGNIFICANTLY_BETTER.value, "Significantly better"),
    (Strength.BETTER.value, "Better"),
    (Strength.SLIGHTLY_BETTER.value, "Slightly better"),
    (Strength.NEGLIGIBLY_BETTER.value, "Negligibly better / unsure"),
]
SAFETY = [
    ("", "— (helpfulness task)"),
    (SafetyLabel.CHOSEN_SAFE_OTHER_UNSAFE.value, "Chosen is safe, the other is not"),
    (SafetyLabel.BOTH_SAFE.value, "Both safe"),
    (SafetyLabel.BOTH_UNSAFE.value, "Both unsafe"),
]


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
