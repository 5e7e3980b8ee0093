from django import forms

from annotation.models import RiskCategory
from annotation.scales import SafetyLabel, Strength

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


class PromptForm(forms.Form):
    """Shape only; the domain and risk-category rules are the service's (prompt_create)."""

    domain = forms.ChoiceField(choices=DOMAINS, widget=forms.Select(attrs={"autofocus": True}))
    risk_category = forms.ChoiceField(
        choices=[("", "— (helpfulness prompt)"), *[(v, label) for v, label in RiskCategory.choices if v != "uncategorized"]],
        required=False,
        help_text="Safety prompts only.",
    )
    text = forms.CharField(widget=forms.Textarea(attrs={"rows": 6}), max_length=20_000, label="Prompt")

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
