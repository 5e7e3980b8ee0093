"""Session log-in, limited like the API's token log-in (annotation.throttling): 429 once refused."""

from django.contrib.auth import views as auth_views
from django.forms.forms import NON_FIELD_ERRORS

from ..forms import LoginForm


class LoginView(auth_views.LoginView):
    template_name = "frontend/login.html"
    authentication_form = LoginForm

    def form_invalid(self, form):
        throttled = form.has_error(NON_FIELD_ERRORS, "throttled")
        response = self.render_to_response(self.get_context_data(form=form, throttled=throttled))
        if throttled:
            response.status_code = 429
        return response
