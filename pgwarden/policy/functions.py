"""Which functions a statement may call.

A function call is opaque code: the engine cannot see what a function does, so it trusts only
a curated list of side-effect-free PostgreSQL built-ins (strings, numbers, dates, JSON, arrays,
aggregates, window functions, type-named casts and the catalog helpers psql's \\d needs). A
policy may extend the list (`allowedFunctions`) or name functions in rules; a few families are
refused whatever a policy says, because they read server files, run SQL the engine never sees,
open connections elsewhere, signal other backends or change who the session is.

Names are compared after the parser has folded case and decoded quoting and `U&"…"` escapes,
so `"UPPER"` is not `upper` and `U&"\\0070g_sleep"` is `pg_sleep`.
"""

from __future__ import annotations

import re

from pgwarden.policy.catalog_names import functions_missing_in

# --- built-ins the engine vouches for (all in pg_catalog) -------------------------------------

_STRING = """
ascii bit_length btrim char_length character_length chr concat concat_ws convert convert_from
convert_to decode encode format initcap left length lower lpad ltrim md5 normalize is_normalized
octet_length overlay parse_ident position quote_ident quote_literal quote_nullable regexp_count
regexp_instr regexp_like regexp_match regexp_matches regexp_replace regexp_split_to_array
regexp_split_to_table regexp_substr repeat replace reverse right rpad rtrim sha224 sha256 sha384
sha512 split_part starts_with string_to_array string_to_table strpos substr substring to_ascii
to_hex translate unistr upper casefold textlen textcat like similar_to_escape like_escape similar_escape
crc32 crc32c to_bin to_oct bpchar varchar text name char
"""
_MATH = """
abs acos acosd acosh asin asind asinh atan atan2 atan2d atand atanh cbrt ceil ceiling cos cosd
cosh cot cotd degrees div erf erfc exp factorial floor gamma gcd lcm lgamma ln log log10 min_scale
mod pi power pow radians random random_normal round scale sign sin sind sinh sqrt tan tand tanh
trim_scale trunc width_bucket setseed numeric int2 int4 int8 float4 float8 bool money
"""
_DATETIME = """
age clock_timestamp date date_add date_bin date_part date_subtract date_trunc extract isfinite
justify_days justify_hours justify_interval make_date make_interval
make_time make_timestamp make_timestamptz now overlaps statement_timestamp timeofday timestamp
timestamptz time timetz interval transaction_timestamp to_char to_date to_number to_timestamp
timezone
"""
_JSON = """
array_to_json json_agg json_agg_strict json_array_elements json_array_elements_text
json_array_length json_build_array json_build_object json_each json_each_text json_extract_path
json_extract_path_text json_object json_object_agg json_object_agg_strict json_object_agg_unique
json_object_agg_unique_strict json_object_keys json_populate_record json_populate_recordset
json_scalar json_serialize json_strip_nulls json_to_record json_to_recordset json_typeof
jsonb_agg jsonb_agg_strict jsonb_array_elements jsonb_array_elements_text jsonb_array_length
jsonb_build_array jsonb_build_object jsonb_concat jsonb_contained jsonb_contains jsonb_delete
jsonb_delete_path jsonb_each jsonb_each_text jsonb_exists jsonb_exists_all jsonb_exists_any
jsonb_extract_path jsonb_extract_path_text jsonb_insert jsonb_object jsonb_object_agg
jsonb_object_agg_strict jsonb_object_agg_unique jsonb_object_agg_unique_strict jsonb_object_keys
jsonb_path_exists jsonb_path_exists_tz jsonb_path_match jsonb_path_match_tz jsonb_path_query
jsonb_path_query_array jsonb_path_query_array_tz jsonb_path_query_first jsonb_path_query_first_tz
jsonb_path_query_tz jsonb_populate_record jsonb_populate_record_valid jsonb_populate_recordset
jsonb_pretty jsonb_set jsonb_set_lax jsonb_strip_nulls jsonb_to_record jsonb_to_recordset
jsonb_typeof row_to_json to_json to_jsonb json jsonb
"""
_ARRAY = """
array_agg array_append array_cat array_dims array_fill array_length array_lower array_ndims
array_position array_positions array_prepend array_remove array_replace array_reverse
array_sample array_shuffle array_sort array_to_string array_upper cardinality
generate_subscripts trim_array unnest
"""
_AGGREGATE = """
any_value avg bit_and bit_or bit_xor bool_and bool_or corr count covar_pop covar_samp every max
min mode percentile_cont percentile_disc range_agg range_intersect_agg regr_avgx regr_avgy
regr_count regr_intercept regr_r2 regr_slope regr_sxx regr_sxy regr_syy stddev stddev_pop
stddev_samp string_agg sum var_pop var_samp variance xmlagg
"""
_WINDOW = """
cume_dist dense_rank first_value lag last_value lead nth_value ntile percent_rank rank row_number
"""
_RANGE = """
daterange datemultirange int4range int4multirange int8range int8multirange isempty lower_inc
lower_inf numrange nummultirange range_merge tsrange tsmultirange tstzrange tstzmultirange
upper_inc upper_inf multirange
"""
_TEXT_SEARCH = """
array_to_tsvector numnode phraseto_tsquery plainto_tsquery querytree setweight strip to_tsquery
to_tsvector ts_delete ts_filter ts_headline ts_rank ts_rank_cd tsquery_phrase tsvector_to_array
websearch_to_tsquery get_current_ts_config json_to_tsvector jsonb_to_tsvector
"""
_NETWORK_UUID_MISC = """
abbrev broadcast family host hostmask inet_merge inet_same_family masklen netmask network
set_masklen trunc macaddr8_set7bit gen_random_uuid uuidv4 uuidv7 uuid_extract_timestamp
uuid_extract_version generate_series num_nonnulls num_nulls bit_count get_bit get_byte
set_bit set_byte area center diameter height width radius point box circle line lseg path polygon
"""
_SESSION_INFO = """
current_database current_query current_schema current_schemas current_setting current_user
inet_client_addr inet_client_port inet_server_addr inet_server_port pg_backend_pid
pg_conf_load_time pg_is_in_recovery pg_postmaster_start_time pg_trigger_depth session_user
version pg_current_xact_id pg_current_xact_id_if_assigned txid_current txid_current_if_assigned
pg_jit_available pg_client_encoding pg_my_temp_schema pg_is_other_temp_schema
pg_current_snapshot txid_current_snapshot pg_xact_status txid_status pg_safe_snapshot_blocking_pids
pg_blocking_pids system_user
"""
# catalog helpers: what psql's \d family and ORMs' introspection call
_CATALOG = """
col_description format_type has_any_column_privilege has_column_privilege has_database_privilege
has_foreign_data_wrapper_privilege has_function_privilege has_language_privilege
has_parameter_privilege has_schema_privilege has_sequence_privilege has_server_privilege
has_table_privilege has_tablespace_privilege has_type_privilege obj_description
pg_collation_is_visible pg_column_compression pg_column_size pg_conversion_is_visible
pg_database_size pg_describe_object pg_encoding_to_char pg_char_to_encoding
pg_function_is_visible pg_get_constraintdef pg_get_expr pg_get_function_arguments
pg_get_function_identity_arguments pg_get_function_result pg_get_functiondef
pg_get_function_sqlbody pg_get_indexdef pg_get_keywords pg_get_partition_constraintdef
pg_get_partkeydef pg_get_ruledef pg_get_serial_sequence pg_get_statisticsobjdef
pg_get_statisticsobjdef_columns pg_get_statisticsobjdef_expressions pg_get_triggerdef
pg_get_userbyid pg_get_viewdef pg_has_role pg_identify_object pg_identify_object_as_address
pg_index_column_has_property pg_index_has_property pg_indexam_has_property pg_indexes_size
pg_opclass_is_visible pg_operator_is_visible pg_opfamily_is_visible pg_relation_filenode
pg_relation_size pg_size_bytes pg_size_pretty pg_statistics_obj_is_visible pg_table_is_visible
pg_table_size pg_tablespace_size pg_total_relation_size pg_ts_config_is_visible
pg_ts_dict_is_visible pg_ts_parser_is_visible pg_ts_template_is_visible pg_type_is_visible
pg_typeof pg_get_object_address pg_options_to_table pg_get_catalog_foreign_keys
pg_partition_root pg_partition_tree pg_partition_ancestors shobj_description
array_to_string to_regclass to_regcollation to_regnamespace to_regoper to_regoperator
to_regproc to_regprocedure to_regrole to_regtype to_regtypemod pg_input_is_valid
pg_input_error_info pg_settings_get_flags pg_basetype
pg_column_toast_chunk_id pg_char_to_encoding pg_get_acl
pg_relation_is_publishable getdatabaseencoding pg_tablespace_location pg_available_extensions
pg_available_extension_versions
"""
_XML = """
xmlcomment xmlexists
xml_is_well_formed xml_is_well_formed_content xml_is_well_formed_document xpath xpath_exists
xmltext
"""

BUILTIN_FUNCTIONS: frozenset[str] = frozenset(
    " ".join(
        (_STRING, _MATH, _DATETIME, _JSON, _ARRAY, _AGGREGATE, _WINDOW, _RANGE, _TEXT_SEARCH,
         _NETWORK_UUID_MISC, _SESSION_INFO, _CATALOG, _XML)
    ).split()
)

# information_schema's own helpers (immutable or stable SQL functions over their arguments), which
# its views and JDBC's DatabaseMetaData call schema-qualified
INFORMATION_SCHEMA_FUNCTIONS: frozenset[str] = frozenset(
    """
_pg_char_max_length _pg_char_octet_length _pg_datetime_precision _pg_expandarray _pg_index_position
_pg_interval_type _pg_numeric_precision _pg_numeric_precision_radix _pg_numeric_scale _pg_truetypid
_pg_truetypmod
""".split()
)

# Functions with a meaning the engine decides itself (they touch a relation or a channel, or are
# safe only for some arguments); analysis.py turns them into accesses.
SEQUENCE_FUNCTIONS = frozenset({"nextval", "setval", "currval", "lastval"})
SPECIAL_FUNCTIONS = SEQUENCE_FUNCTIONS | {"set_config", "pg_notify", "pg_sleep", "pg_sleep_for",
                                          "pg_sleep_until"}

# --- refused whatever a policy says -----------------------------------------------------------

# Exact names (in any schema: a user function with one of these names is suspicious anyway).
_ALWAYS_DENIED_NAMES = {
    # server files and programs
    "pg_read_file": "reads files on the database server",
    "pg_read_binary_file": "reads files on the database server",
    "pg_ls_dir": "lists folders on the database server",
    "pg_stat_file": "inspects files on the database server",
    "pg_file_write": "writes files on the database server",
    "pg_file_rename": "renames files on the database server",
    "pg_file_unlink": "deletes files on the database server",
    "pg_file_sync": "touches files on the database server",
    "pg_logdir_ls": "lists folders on the database server",
    # backend signalling and server control
    "pg_terminate_backend": "signals other database sessions",
    "pg_cancel_backend": "signals other database sessions",
    "pg_reload_conf": "reloads the server configuration",
    "pg_rotate_logfile": "rotates the server log",
    "pg_log_backend_memory_contexts": "signals other database sessions",
    "pg_promote": "promotes a standby server",
    "pg_switch_wal": "forces a WAL switch",
    "pg_create_restore_point": "writes to the WAL",
    "pg_logical_emit_message": "writes to the WAL",
    "pg_backup_start": "controls backups",
    "pg_backup_stop": "controls backups",
    "pg_wal_replay_pause": "controls replication",
    "pg_wal_replay_resume": "controls replication",
    "pg_import_system_collations": "changes the catalogs",
    "pg_replication_origin_create": "controls replication",
    "pg_replication_origin_drop": "controls replication",
    "pg_set_relation_stats": "changes planner statistics",
    "pg_clear_relation_stats": "changes planner statistics",
    "pg_restore_relation_stats": "changes planner statistics",
    "pg_restore_attribute_stats": "changes planner statistics",
    "pg_set_attribute_stats": "changes planner statistics",
    "pg_clear_attribute_stats": "changes planner statistics",
    # functions that run SQL text the engine never sees
    "query_to_xml": "runs SQL text the policy engine cannot see",
    "query_to_xmlschema": "runs SQL text the policy engine cannot see",
    "query_to_xml_and_xmlschema": "runs SQL text the policy engine cannot see",
    "cursor_to_xml": "reads a cursor the policy engine cannot see",
    "cursor_to_xmlschema": "reads a cursor the policy engine cannot see",
    "table_to_xml": "reads a table named by a string",
    "table_to_xmlschema": "reads a table named by a string",
    "table_to_xml_and_xmlschema": "reads a table named by a string",
    "schema_to_xml": "reads whole schemas",
    "schema_to_xmlschema": "reads whole schemas",
    "schema_to_xml_and_xmlschema": "reads whole schemas",
    "database_to_xml": "reads the whole database",
    "database_to_xmlschema": "reads the whole database",
    "database_to_xml_and_xmlschema": "reads the whole database",
    "ts_stat": "runs SQL text the policy engine cannot see",
    "ts_rewrite": "can run SQL text the policy engine cannot see",
    # statistics resets
    "pg_stat_reset": "resets server statistics",
    "pg_stat_reset_shared": "resets server statistics",
    "pg_stat_reset_single_table_counters": "resets server statistics",
    "pg_stat_reset_single_function_counters": "resets server statistics",
    "pg_stat_reset_slru": "resets server statistics",
    "pg_stat_reset_replication_slot": "resets server statistics",
    "pg_stat_reset_subscription_stats": "resets server statistics",
    "pg_stat_reset_backend_stats": "resets server statistics",
}

# Prefix families, refused in any schema.
_ALWAYS_DENIED_PREFIXES = (
    ("lo_", "works on large objects (server files and unaudited storage)"),
    ("dblink", "opens connections to other databases"),
    ("pg_create_", "controls replication slots"),
    ("pg_drop_replication", "controls replication slots"),
    ("pg_replication_slot", "controls replication slots"),
    ("pg_logical_slot", "controls replication slots"),
    ("pg_copy_", "controls replication slots"),
    ("pg_ls_", "lists folders on the database server"),
    ("pg_read_", "reads files on the database server"),
    ("pg_file_", "touches files on the database server"),
    ("postgres_fdw", "opens connections to other databases"),
)
# large-object helpers without the lo_ prefix
_LARGE_OBJECT_NAMES = {"loread", "lowrite", "lo_import", "lo_export"}

# Refused unless a policy names them (allowedFunctions or a rule's functions).
_DENIED_UNLESS_NAMED_PREFIXES = (
    ("pg_advisory", "takes advisory locks that outlive the statement"),
    ("pg_try_advisory", "takes advisory locks that outlive the statement"),
)

def always_denied(name: str) -> str | None:
    """Why a function (bare name, any schema) is refused whatever a policy says, or None."""
    reason = _ALWAYS_DENIED_NAMES.get(name)
    if reason:
        return reason
    if name in _LARGE_OBJECT_NAMES:
        return "works on large objects"
    for prefix, why in _ALWAYS_DENIED_PREFIXES:
        if name.startswith(prefix):
            return why
    return None


def denied_unless_named(name: str) -> str | None:
    """Why a function needs an explicit mention in the policy, or None."""
    for prefix, why in _DENIED_UNLESS_NAMED_PREFIXES:
        if name.startswith(prefix):
            return why
    return None


def is_builtin(name: str, server_version: int = 0) -> bool:
    """A built-in the engine vouches for, and one that server's pg_catalog has (0: the newest):
    on an older server an unqualified `uuidv7()` runs whatever `uuidv7` the search_path holds."""
    return name in BUILTIN_FUNCTIONS and name not in functions_missing_in(server_version)


# --- settings a session may change ------------------------------------------------------------

# GUCs an agent may SET / RESET (lower case). Everything else is refused: role and
# session_authorization change who the session is, search_path changes what names mean,
# standard_conforming_strings and client_encoding change how the server reads the text the engine
# parsed, and most others are for administrators.
SAFE_SETTINGS = frozenset(
    """
    application_name datestyle intervalstyle timezone extra_float_digits lock_timeout
    statement_timeout idle_in_transaction_session_timeout idle_session_timeout transaction_timeout
    bytea_output client_min_messages lc_monetary lc_numeric lc_time
    default_transaction_isolation default_transaction_read_only default_transaction_deferrable
    transaction_isolation transaction_read_only transaction_deferrable
    xmloption xmlbinary timezone_abbreviations cursor_tuple_fraction plan_cache_mode
    work_mem maintenance_work_mem hash_mem_multiplier temp_buffers jit
    enable_async_append enable_bitmapscan enable_gathermerge enable_group_by_reordering
    enable_hashagg enable_hashjoin enable_incremental_sort enable_indexonlyscan enable_indexscan
    enable_material enable_memoize enable_mergejoin enable_nestloop enable_parallel_append
    enable_parallel_hash enable_partition_pruning enable_partitionwise_aggregate
    enable_partitionwise_join enable_presorted_aggregate enable_seqscan enable_sort enable_tidscan
    enable_distinct_reordering enable_self_join_elimination
    random_page_cost seq_page_cost cpu_tuple_cost cpu_index_tuple_cost cpu_operator_cost
    effective_cache_size default_statistics_target from_collapse_limit join_collapse_limit
    geqo max_parallel_workers_per_gather parallel_setup_cost parallel_tuple_cost
    gin_fuzzy_search_limit row_security synchronize_seqscans constraint_exclusion
    """.split()
)
# Only this value is accepted for client_encoding: the engine parses UTF-8 text.
UTF8_NAMES = frozenset({"utf8", "utf-8", "unicode"})
# Settings bounded by the policy's statementTimeout.
TIMEOUT_SETTINGS = frozenset({"statement_timeout", "transaction_timeout"})


_PG_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "min": 60_000.0, "h": 3_600_000.0, "d": 86_400_000.0}
_PG_DURATION = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(us|ms|s|min|h|d)?\s*")


def pg_duration_ms(value: str | int | float) -> float | None:
    """A timeout setting's value in milliseconds as PostgreSQL reads it, or None if unreadable."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    m = _PG_DURATION.fullmatch(value)
    if not m:
        return None
    return float(m.group(1)) * _PG_UNITS[m.group(2) or "ms"]
