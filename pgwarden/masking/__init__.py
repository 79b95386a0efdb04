"""Masking: no sensitive value leaves the proxy in clear, whatever the shape of the query.

Pure code, no sockets: the proxy calls it at four points (see `subject.py` for the order).
"""

from pgwarden.masking.catalog import Catalog, CatalogCache, Relation, load_catalog
from pgwarden.masking.copy import CopyRewriter
from pgwarden.masking.detectors import BUILTIN_DETECTORS, DetectorSet, iban_ok, luhn_ok
from pgwarden.masking.errors_text import mask_error_fields
from pgwarden.masking.lineage import ColumnPlan
from pgwarden.masking.model import ColumnRule, MaskingRule, parse_masking_rule
from pgwarden.masking.rows import (
    RowRewriter,
    build_data_row,
    build_row_description,
    parse_data_row,
    parse_row_description,
)
from pgwarden.masking.ruleset import MaskingSet, load_masking
from pgwarden.masking.strategies import REDACTED, STRATEGIES
from pgwarden.masking.subject import MaskingSession, ResultPlan, StatementPlan, SubjectMasking
from pgwarden.pgwire import Field

__all__ = [
    "BUILTIN_DETECTORS",
    "REDACTED",
    "STRATEGIES",
    "Catalog",
    "CatalogCache",
    "ColumnPlan",
    "ColumnRule",
    "CopyRewriter",
    "DetectorSet",
    "Field",
    "MaskingRule",
    "MaskingSession",
    "MaskingSet",
    "Relation",
    "ResultPlan",
    "RowRewriter",
    "StatementPlan",
    "SubjectMasking",
    "build_data_row",
    "build_row_description",
    "iban_ok",
    "load_catalog",
    "load_masking",
    "luhn_ok",
    "mask_error_fields",
    "parse_data_row",
    "parse_masking_rule",
    "parse_row_description",
]
