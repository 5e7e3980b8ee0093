"""DRF's side of annotation.validation: the API's parser and fields refuse what the web pages and the
importers refuse, with the same messages."""

from django.db import models
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers
from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser

from annotation.services.errors import InvalidInput
from annotation.validation import (
    MAX_LABEL_CHARS,
    check_json,
    check_request_json,
    check_text,
    check_time_on_task_ms,
)


def _as_validation_error(error: InvalidInput) -> serializers.ValidationError:
    return serializers.ValidationError(error.message, code="invalid")


class CheckedJSONParser(JSONParser):
    """JSON bodies whose every key and string, at any depth, is storable text; a body nested past what the
    decoder can follow is a 400, not a RecursionError."""

    def parse(self, stream, media_type=None, parser_context=None):
        try:
            data = super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError("JSON parse error - the body is nested too deeply") from None
        try:
            check_request_json(data)
        except InvalidInput as e:
            raise serializers.ValidationError({e.field or "non_field_errors": [e.message]}) from None
        return data


class TextField(serializers.CharField):
    """Text only (a number is not text), storable (no NUL, no lone surrogate), at most `max_length`."""

    def to_internal_value(self, data):
        try:
            check_text(data, field=self.field_name, max_length=self.max_length)
        except InvalidInput as e:
            raise _as_validation_error(e) from None
        return super().to_internal_value(data)


class ChoiceTextField(serializers.ChoiceField):
    """A choice whose refusal message can always be rendered (DRF's echoes the input, surrogates and all)."""

    def to_internal_value(self, data):
        try:
            check_text(data, field=self.field_name, max_length=MAX_LABEL_CHARS)
        except InvalidInput as e:
            raise _as_validation_error(e) from None
        return super().to_internal_value(data)


class JSONValueField(serializers.JSONField):
    """Free-form settings (metrics, sampling, params): storable keys and strings at any depth, bounded size."""

    def to_internal_value(self, data):
        value = super().to_internal_value(data)
        try:
            return check_json(value, field=self.field_name)
        except InvalidInput as e:
            raise _as_validation_error(e) from None


class JSONObjectField(JSONValueField):
    def to_internal_value(self, data):
        if not isinstance(data, dict):
            raise serializers.ValidationError(f"{self.field_name} must be an object", code="invalid")
        return super().to_internal_value(data)


@extend_schema_field(OpenApiTypes.INT)
class TimeOnTaskField(serializers.Field):
    """Milliseconds on the task as the client measured it: `annotation.validation.check_time_on_task_ms`."""

    def to_internal_value(self, data):
        try:
            return check_time_on_task_ms(data)
        except InvalidInput as e:
            raise _as_validation_error(e) from None

    def to_representation(self, value):
        return value


class CheckedModelSerializer(serializers.ModelSerializer):
    """A ModelSerializer whose text and JSON columns get the fields above."""

    serializer_field_mapping = {
        **serializers.ModelSerializer.serializer_field_mapping,
        models.CharField: TextField,
        models.TextField: TextField,
        models.JSONField: JSONValueField,
    }
    serializer_choice_field = ChoiceTextField
