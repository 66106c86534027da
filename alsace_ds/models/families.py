"""The model families alsace_ds adapts and the label heads each offers (one definition,
read by the config's validation, the model loader, the tiny-model builder and the planner)."""

FAMILIES: tuple[str, ...] = ("xlmr", "mt5")

# The heads each family offers; the first is the family's default (``model.head: null``).
HEADS: dict[str, tuple[str, ...]] = {
    "xlmr": ("classification", "cloze"),
    "mt5": ("label_words",),
}
