"""Keel's validators.

Each check is a plain function in its own module (no guardrails-ai import, testable on its own):

=================================  ==============================================  ========================
guardrails-ai name                 pure function                                   module
=================================  ==============================================  ========================
``keel/prompt_injection``          :func:`detect_injection`                        injection.py
``keel/harmful_request``           :func:`check_harmful` (+ classifier)            harmful.py
``keel/pii``                       :func:`check_pii` / :func:`find_pii` + vault     pii.py
``keel/toxicity``                  :func:`check_toxicity`                          toxicity.py
``keel/topic``                     :func:`check_topics`                            topics.py
``keel/groundedness``              :func:`check_groundedness`                      groundedness.py
``keel/json_schema``               :func:`check_json_schema`                       json_schema.py
``keel/system_prompt_leakage``     :func:`check_system_prompt_leakage`             leakage.py
``keel/secrets``                   :func:`check_secrets`                           leakage.py
=================================  ==============================================  ========================

``guardrails_ai.py`` wraps them as guardrails-ai ``Validator`` classes with ``@register_validator``; it is
imported (and guardrails-ai with it) only by the engine, at warm-up.
"""

KEEL_VALIDATORS = (
    "keel/prompt_injection",
    "keel/harmful_request",
    "keel/pii",
    "keel/toxicity",
    "keel/topic",
    "keel/groundedness",
    "keel/json_schema",
    "keel/system_prompt_leakage",
    "keel/secrets",
)
