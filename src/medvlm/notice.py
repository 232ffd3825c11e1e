"""The research-only notice carried by every model, card, UI, API and report medvlm produces."""

NOTICE = (
    "medvlm models are for research use only. They are not medical devices, are not validated "
    "for clinical use, and must not be used for diagnosis, treatment or any patient-care decision."
)
SHORT_NOTICE = "Research use only - not for clinical use."
