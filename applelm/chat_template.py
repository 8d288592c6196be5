"""Render Hugging Face style Jinja chat templates, the way transformers' apply_chat_template does.

Same environment: sandboxed, trim_blocks and lstrip_blocks, loop controls, the `{% generation %}` block
(rendered as its plain body), `tojson` without HTML escaping, and the raise_exception / strftime_now
globals. Errors in a template, or ones it raises on purpose, reach the user as a UserError.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import UserError


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; here it is a no-op."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """The compiled template (cached by source); a syntax error becomes a UserError."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, "jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise UserError(f"the chat template is not valid Jinja (line {e.lineno}): {e.message}") from None


def render(source: str, context: dict[str, Any]) -> str:
    """Render `source` with `context`; any template error becomes a UserError with its message."""
    template = compile_template(source)
    try:
        return template.render(**context)
    except jinja2.exceptions.TemplateError as e:
        raise UserError(f"chat template error: {e.message or e}") from None
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, ArithmeticError) as e:
        # A template that does e.g. `'text' + message['content']` on list content fails in Python itself.
        raise UserError(f"chat template error: {type(e).__name__}: {e}") from None
