"""Conditioning in the recipe: metadata prefixes (MeCo) and control tokens on data sources.

What the compiler needs of ``data.sources[].metadata`` and ``data.sources[].control``:
the checks ``malt check`` reports, the control tokens the tokenizer gets, the
spec entries the runtime reads (:mod:`malt.runtime.conditioning` does the work),
and whether a phase reads the sources without their metadata.
"""

from __future__ import annotations

from pathlib import Path


def all_sources(recipe) -> list:
    """Every source spec the recipe names (the data section's, then the phases' own), in order."""
    data = getattr(recipe, "data", None)                      # None in a partial recipe (a section failed the schema)
    out = list(data.sources) if data is not None else []
    for ph in getattr(recipe, "phases", None) or []:
        if ph.data is not None and ph.data.sources:
            out += list(ph.data.sources)
    return out


def control_tokens(recipe) -> list[str]:
    """The good and bad tokens of every source with control tokens, in order, each once."""
    out = []
    for s in all_sources(recipe):
        if s.control is not None:
            out += [s.control.good, s.control.bad]
    return list(dict.fromkeys(out))


def uses_metadata(recipe) -> bool:
    return any(s.metadata is not None for s in all_sources(recipe))


def phase_metadata(phase_spec) -> bool:
    """Whether a phase reads its sources with their metadata prefixes (``data.metadata``, on unless set off)."""
    return phase_spec.data is None or phase_spec.data.metadata == "on"


def metadata_off(plan) -> bool:
    """Whether some phase reads the sources without their metadata (the runtime then prepares both variants)."""
    return uses_metadata(plan.recipe) and any(not ph.metadata for ph in plan.phases)


def source_entry(s) -> dict:
    """The conditioning keys of a source's entry in the runtime's data spec (none when unconditioned)."""
    out = {}
    if s.metadata is not None:
        out["metadata"] = s.metadata.model_dump()
    if s.control is not None:
        out["control"] = s.control.model_dump()
    return out


def masked_target_reasons(plan) -> list[str]:
    """Why some targets of this recipe are -100 (no loss); empty when every position counts."""
    r = plan.recipe
    why = []
    if uses_metadata(r):
        why.append("metadata tokens of data.sources[].metadata")
    if any(s.control is not None and not s.control.loss for s in all_sources(r)):
        why.append("control tokens of data.sources[].control")
    if getattr(r.data, "packing", "concat") == "best_fit":
        why.append("best_fit padding")
    kinds = {getattr(o, "kind", None) for o in [r.objective, *[getattr(ph, "objective", None) for ph in r.phases or []]] if o is not None}
    if kinds & {"prefix_lm", "span_corruption", "ul2"}:
        why.append("the objective's inputs")
    return why


def problems(recipe, base_dir: Path) -> list[tuple]:
    """(path, message, hint) for each problem of the recipe's conditioning."""
    from malt.runtime.conditioning import metadata_problems
    from malt.runtime.sources import classify, is_glob

    out = []
    r = recipe
    specials = set(r.tokenizer.special_tokens) if getattr(r, "tokenizer", None) is not None else set()
    phases = getattr(r, "phases", None) or []
    places = [(("data", "sources", i), s) for i, s in enumerate(r.data.sources)]
    for i, ph in enumerate(phases):
        for j, s in enumerate(ph.data.sources if ph.data is not None and ph.data.sources else []):
            places.append((("phases", i, "data", "sources", j), s))
    for where, s in places:
        if s.metadata is None and s.control is None:
            continue
        key = "metadata" if s.metadata is not None else "control"
        plain = s.path.startswith("builtin:") or (
            not is_glob(s.path) and (base_dir / s.path).is_file() and (classify(Path(s.path).name) or ("",))[0] == "txt")
        if plain:
            out.append((where + (key,), f"{key} reads record fields, but {s.path} is plain text without fields",
                        f"remove {key} from this source, or use .jsonl or .parquet records with the fields"))
        if s.metadata is not None:
            for k, msg in metadata_problems(s.metadata.model_dump()):
                out.append((where + ("metadata", k), msg,
                            'write the template with {domain} (the host of url_field) or {FIELD} (a record field), such as "URL: {domain}\\n\\n"'))
        c = s.control
        if c is not None:
            if c.good == c.bad:
                out.append((where + ("control", "bad"), f"the good and bad tokens are the same ({c.good!r})", "use two different tokens"))
            for k in ("good", "bad"):
                if getattr(c, k) in specials:
                    out.append((where + ("control", k), f"{getattr(c, k)!r} is one of tokenizer.special_tokens",
                                "use a token of its own, such as <|good|> and <|bad|>"))
            if not 0 <= c.unprefixed < 1:
                out.append((where + ("control", "unprefixed"), f"must be a share in [0%, 100%), got {c.unprefixed:g}",
                            "such as 10% (units left without a control token)"))
    metadata = any(s.metadata is not None for _, s in places)
    kinds = {getattr(o, "kind", "causal_lm") for o in [getattr(r, "objective", None), *(getattr(ph, "objective", None) for ph in phases)]
             if o is not None} - {"causal_lm"}
    for i, ph in enumerate(phases):
        if not phase_metadata(ph) and not metadata:
            out.append((("phases", i, "data", "metadata"), "no data source has metadata to turn off",
                        "give a source `metadata: {template: \"URL: {domain}\\n\\n\"}`, or remove data.metadata from the phase"))
        elif not phase_metadata(ph) and kinds:
            out.append((("phases", i, "data", "metadata"), f"a phase with metadata off is not built yet for objective {min(kinds)}",
                        "use objective causal_lm, or keep the metadata on"))
    return out
