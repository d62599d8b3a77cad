
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lsp.postprocess import (
    Candidate,
    close_brackets,
    drop_suffix_repeats,
    introduces_syntax_error,
    is_empty,
    keep_the_cursors_indentation,
    limit_to_scope,
    postprocess,
    single_line,
    stop_at_suffix_closer,
    trim_end,
)

LANGUAGES = ["python", "javascript", "typescript", "typescriptreact", "go", "rust", "java", "c", "cpp", None]

# ---------------------------------------------------------------- keep_the_cursors_indentation


def test_indentation_javascript_body_after_auto_indent():
    assert keep_the_cursors_indentation("  a += b;", "function add(a, b) {\n  ") == "a += b;"
    got = keep_the_cursors_indentation("  a += b;\n    return a;", "function add(a, b) {\n  ")
    assert got == "a += b;\n  return a;"  # every line moves left as much


def test_indentation_python_next_statement_at_the_same_level():
    assert keep_the_cursors_indentation("    y = 2", "def f():\n    x = 1\n    ") == "y = 2"


def test_indentation_left_alone_where_the_cursor_is_not_at_an_editors_indentation():
    assert keep_the_cursors_indentation(" b", "x = a +") == " b"  # mid-line
    assert keep_the_cursors_indentation("    return x", "def f(x):\n") == "    return x"  # a line start
    assert keep_the_cursors_indentation("  c)", "foo(a,\n    ") == "  c)"  # a continuation line
    assert keep_the_cursors_indentation("    x = 1", "if ok:\n        y = 2\n    ") == "    x = 1"  # dedented
    assert keep_the_cursors_indentation(" if n:", "    for n in ns:\n       ") == " if n:"  # mid-indentation


# ---------------------------------------------------------------- single_line


def test_single_line_keeps_the_first_line_python():
    assert single_line("return a + b\n\ndef g():\n    pass") == "return a + b"


def test_single_line_keeps_the_first_line_javascript():
    assert single_line("console.log(x);\n}") == "console.log(x);"


def test_single_line_leaves_one_line_alone():
    assert single_line("fmt.Println(x)") == "fmt.Println(x)"


# ---------------------------------------------------------------- limit_to_scope


FIB_BODY = "if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)"


def test_scope_python_body_stops_before_dedented_def():
    infill = FIB_BODY + "\n\n\ndef main():\n    print(fib(10))\n"
    assert limit_to_scope(infill, "def fib(n):\n    ", "\n") == FIB_BODY


def test_scope_python_body_from_end_of_opener_line():
    infill = "\n    " + FIB_BODY + "\n\nprint(fib(3))"
    assert limit_to_scope(infill, "def fib(n):", "") == "\n    " + FIB_BODY


def test_scope_python_same_level_statements_are_kept_in_a_block():
    head = "def total(xs):\n    s = 0\n    "
    infill = "for x in xs:\n        s += x\n    return s\n\nclass Foo:\n    pass"
    assert limit_to_scope(infill, head, "\n") == "for x in xs:\n        s += x\n    return s"


def test_scope_python_finishing_a_statement_ends_with_it():
    head = "def f(a, b):\n    total = "
    assert limit_to_scope("a + b\n    return total", head, "\n") == "a + b"


def test_scope_python_else_continues_the_if():
    infill = "\n    a()\nelse:\n    b()\nprint('done')"
    assert limit_to_scope(infill, "if x:", "") == "\n    a()\nelse:\n    b()"


def test_scope_javascript_closing_brace_dropped_when_suffix_closes():
    infill = "\n  return n * 2;\n}\n\nfunction g() {\n  return 1;\n}"
    assert limit_to_scope(infill, "function f(n) {", "\n}\n") == "\n  return n * 2;"


def test_scope_javascript_closing_brace_kept_when_suffix_lacks_it():
    infill = "\n  return n * 2;\n}\n\nfunction g() {\n  return 1;\n}"
    assert limit_to_scope(infill, "function f(n) {", "\n\nmodule.exports = f;\n") == "\n  return n * 2;\n}"


def test_scope_javascript_else_branch_continues():
    infill = "\n  a();\n} else {\n  b();\n}\nc();"
    assert limit_to_scope(infill, "if (x) {", "") == "\n  a();\n} else {\n  b();\n}"


def test_scope_javascript_else_cut_when_suffix_closes():
    infill = "\n  a();\n} else {\n  b();\n}"
    assert limit_to_scope(infill, "if (x) {", "\n}\n") == "\n  a();"


def test_scope_go_inner_closer_kept_when_suffix_closes_the_outer_block():
    head = "func sum(n int) int {\n\ts := 0\n\tfor i := 0; i < n; i++ {"
    infill = "\n\t\ts += i\n\t}\n\treturn s\n}"
    # The suffix's `}` (column 0) closes the function, not the loop.
    assert limit_to_scope(infill, head, "\n}\n") == "\n\t\ts += i\n\t}"


def test_scope_single_line_infill_untouched():
    assert limit_to_scope("x + 1", "y = ", "\n") == "x + 1"


# ---------------------------------------------------------------- drop_suffix_repeats


def test_repeats_python_next_line_is_cut():
    head = "def f(a, b):\n    total = a + b\n    "
    assert drop_suffix_repeats("total *= 2\n    return total", head, "\n    return total\n") == "total *= 2"


def test_repeats_python_several_lines_are_cut():
    head = "def f(xs):\n    "
    tail = "\n    ys = sorted(xs)\n\n    return ys[0]\n"
    infill = "xs = list(xs)\n    ys = sorted(xs)\n\n    return ys[0]"
    assert drop_suffix_repeats(infill, head, tail) == "xs = list(xs)"


def test_repeats_python_block_running_into_the_suffix_is_cut_where_it_meets_it():
    """The model writes the missing header, then the body and the rest that follow the cursor (spaced its
    own way): the header alone is the completion."""
    head = "def count(num):\n    even = 0\n    for i in str(num):\n"
    tail = "\n            even +=1\n        else:\n            odd += 1\n    return even\n"
    infill = ("        if int(i) % 2 == 0:\n            even += 1\n        else:\n            odd += 1\n"
              "    return (even, odd)")
    assert drop_suffix_repeats(infill, head, tail) == "        if int(i) % 2 == 0:"


def test_repeats_one_line_like_the_suffix_is_not_a_repeat_of_two():
    head = "def f(xs):\n    for x in xs:\n        "
    tail = "\n        total += x\n    return total\n"
    infill = "if x < 0:\n            continue\n        total += x\n        count += 1"
    assert drop_suffix_repeats(infill, head, tail) == infill
    # Deeper than the suffix's line, the same statement is not the suffix's.
    assert drop_suffix_repeats("if x:\n            total += x", head, tail) == "if x:\n            total += x"


def test_repeats_whole_infill_repeating_next_line_leaves_nothing():
    assert drop_suffix_repeats("return x", "def f(x):\n    ", "\n    return x\n") == ""


def test_repeats_javascript_inner_closer_is_not_the_outer_one():
    head = "function f(x) {\n"
    infill = "  if (x) {\n    g();\n  }"
    assert drop_suffix_repeats(infill, head, "\n}\n") == infill


def test_repeats_javascript_overlap_with_rest_of_line():
    assert drop_suffix_repeats("a, b)", "foo(", ", b);\n") == "a"


def test_repeats_python_overlap_keeps_separating_space():
    head = "result = compute("
    assert drop_suffix_repeats("gamma, alpha, beta)", head, "alpha, beta)\n") == "gamma, "


def test_repeats_overlap_must_not_split_a_word():
    assert drop_suffix_repeats("2 * a", "print(", "a_value)\n") == "2 * a"


def test_repeats_overlap_of_closers_alone_is_left_to_close_brackets():
    assert drop_suffix_repeats('"hi")', "print(", ")\n") == '"hi")'


# ---------------------------------------------------------------- close_brackets


def test_brackets_python_replaces_auto_closed_paren():
    assert close_brackets('"hi")', "print(", ")\n") == ('"hi")', 1)


def test_brackets_python_own_closer_replaces_nothing():
    assert close_brackets("len(x)", "print(", ")\n") == ("len(x)", 0)


def test_brackets_python_quote_and_paren():
    assert close_brackets('hi")', 'print("', '")\n') == ('hi")', 2)


def test_brackets_javascript_nested_auto_close():
    assert close_brackets("x))", "foo(bar(", "));\n") == ("x))", 2)
    assert close_brackets("x)", "foo(bar(", "));\n") == ("x)", 1)


def test_brackets_rust_array():
    assert close_brackets("1, 2, 3]", "let v = vec![", "];\n") == ("1, 2, 3]", 1)


def test_brackets_never_doubled_even_when_unbalanced():
    assert close_brackets("a))", "print(", ")\n") == ("a))", 1)


def test_brackets_multiline_drops_our_closer():
    assert close_brackets("\n    a,\n    b,\n)", "foo(", ")\n") == ("\n    a,\n    b,\n", 0)


def test_brackets_nothing_to_replace():
    assert close_brackets("x + 1", "y = ", "\n") == ("x + 1", 0)
    assert close_brackets("x + 1", "f(", ")\n") == ("x + 1", 0)


# ---------------------------------------------------------------- stop_at_suffix_closer


def test_suffix_closer_python_call_that_runs_on_is_cut():
    assert stop_at_suffix_closer("a, b) + 1", ")\n") == "a, b"


def test_suffix_closer_python_f_string_field():
    assert stop_at_suffix_closer('name}!"', '}"\n') == "name"


def test_suffix_closer_javascript_template_substitution():
    assert stop_at_suffix_closer("user.name}!`", "}`;\n") == "user.name"


def test_suffix_closer_other_closer_or_none_left_alone():
    assert stop_at_suffix_closer("a] + 1", ")\n") == "a] + 1"
    assert stop_at_suffix_closer("a) + 1", "\n") == "a) + 1"
    assert stop_at_suffix_closer("len(x) + 1", ")\n") == "len(x) + 1"


def test_suffix_closer_inside_a_string_of_the_infill_is_not_one():
    assert stop_at_suffix_closer('")" + x', ")\n") == '")" + x'


# ---------------------------------------------------------------- introduces_syntax_error


def test_syntax_python_garbage_is_an_error():
    assert introduces_syntax_error("3.14 * r r", 0, "def area(r):\n    return ", "\n", "python")


def test_syntax_python_valid_completion_is_fine():
    assert not introduces_syntax_error("3.14 * r * r", 0, "def area(r):\n    return ", "\n", "python")


def test_syntax_python_block_opener_left_for_the_user():
    head = "def f(n):\n    "
    assert not introduces_syntax_error("for i in range(n):", 0, head, "\n    return n\n", "python")


def test_syntax_javascript_unclosed_brace_left_for_the_user():
    head = "function f(n) {\n  "
    assert not introduces_syntax_error("for (let i = 0; i < n; i++) {", 0, head, "\n  return n;\n}\n", "javascript")


def test_syntax_javascript_mismatched_bracket_is_an_error():
    assert introduces_syntax_error("foo(1]", 0, "function f() {\n  return ", ";\n}\n", "javascript")


def test_syntax_replaced_closer_is_accounted_for():
    assert not introduces_syntax_error('"hi")', 1, "print(", ")\n", "python")
    assert introduces_syntax_error('"hi"))', 1, "print(", ")\n", "python")


def test_syntax_rust():
    head = "fn total(v: &[i32]) -> i32 {\n    let t: i32 = "
    assert not introduces_syntax_error("v.iter().sum();", 0, head, "\n    t\n}\n", "rust")
    assert introduces_syntax_error("v.iter(.sum();", 0, head, "\n    t\n}\n", "rust")


def test_syntax_go_existing_error_elsewhere_is_tolerated():
    head = "package main\n\nfunc broken() {\n\tx := \n}\n\nfunc f(n int) int {\n\treturn "
    tail = "\n}\n"
    assert not introduces_syntax_error("n * 2", 0, head, tail, "go")
    assert introduces_syntax_error("n * * 2 )", 0, head, tail, "go")


def test_syntax_statement_already_broken_at_cursor_may_stay_incomplete():
    head = "def f(a, b):\n    x = foo(a,\n            "
    assert not introduces_syntax_error("b,", 0, head, "\n    return x\n", "python")


def test_syntax_plain_text_is_never_checked():
    assert not introduces_syntax_error("))) ((( ", 0, "hello ", "\n", None)
    assert not introduces_syntax_error("))) ((( ", 0, "hello ", "\n", "markdown")


def test_syntax_java_window_starting_inside_a_long_class():
    methods = "".join(f"    int m{i}(int x) {{\n        return x + {i};\n    }}\n\n" for i in range(60))
    head = "class Big {\n" + methods + "    int g(int a) {\n        int b = a * 2;\n        "
    tail = "\n        return b;\n    }\n}\n"
    assert not introduces_syntax_error("b += 1;", 0, head, tail, "java")
    assert introduces_syntax_error("b = foo(;", 0, head, tail, "java")


# ---------------------------------------------------------------- trim_end, is_empty


def test_trim_end_strips_trailing_whitespace_and_lines():
    assert trim_end("return x  \n    \n", "\n") == "return x"


def test_trim_end_keeps_space_before_rest_of_line():
    assert trim_end("not ", "y\n") == "not "
    assert trim_end("a,\n    ", ")\n") == "a,"


def test_is_empty():
    assert is_empty("") and is_empty("  \n\t") and not is_empty(" x")


# ---------------------------------------------------------------- postprocess, end to end


def test_fib_body_cut_before_next_def():
    infill = FIB_BODY + "\n\n\ndef main():\n    print(fib(10))\n"
    got = postprocess(infill, prefix="def fib(n):\n    ", suffix="\n", language="python", multiline=True)
    assert got == Candidate(FIB_BODY)


def test_print_with_auto_closed_paren():
    got = postprocess('"hi")', prefix="print(", suffix=")\n", language="python", multiline=False)
    assert got == Candidate('"hi")', replace_suffix=1)


def test_syntax_error_rejected():
    prefix = "def area(r):\n    return "
    assert postprocess("3.14 * r r", prefix=prefix, suffix="\n", language="python", multiline=False) is None


def test_repeat_of_next_suffix_line_trimmed():
    prefix = "def f(a, b):\n    total = a + b\n    "
    suffix = "\n    return total\n"
    got = postprocess("total *= 2\n    return total\n", prefix=prefix, suffix=suffix, language="python", multiline=True)
    assert got == Candidate("total *= 2")


def test_single_line_mode_cuts_and_strips():
    got = postprocess("x = 1   \ny = 2", prefix="", suffix="", language="python", multiline=False)
    assert got == Candidate("x = 1")


def test_leading_space_is_kept():
    got = postprocess(" + 1", prefix="const y = x", suffix=";\n", language="javascript", multiline=False)
    assert got == Candidate(" + 1")


def test_f_string_field_that_runs_on_past_its_brace():
    prefix = 'def greet(user):\n    name = user.name\n    return f"Hello, {'
    got = postprocess('name}!"', prefix=prefix, suffix='}"\n', language="python", multiline=False)
    assert got == Candidate("name")


def test_javascript_body_after_auto_indent_keeps_the_files_indentation():
    got = postprocess("  a += b;", prefix="function add(a, b) {\n  ", suffix="\n}\n", language="javascript",
                      multiline=True)
    assert got == Candidate("a += b;")


def test_javascript_array_with_auto_closed_bracket_and_typed_semicolon():
    got = postprocess("1, 2];", prefix="const a = [", suffix="];\n", language="javascript", multiline=False)
    assert got == Candidate("1, 2")


def test_go_body_multiline():
    prefix = "package main\n\nfunc double(n int) int {"
    infill = "\n\treturn n * 2\n}\n\nfunc main() {}\n"
    got = postprocess(infill, prefix=prefix, suffix="\n}\n", language="go", multiline=True)
    assert got == Candidate("\n\treturn n * 2")


def test_crlf_document_gets_crlf_lines():
    prefix = "def f(x):\r\n    "
    got = postprocess("y = x\n    return y\n", prefix=prefix, suffix="\r\n", language="python", multiline=True)
    assert got == Candidate("y = x\r\n    return y")


def test_whitespace_only_infill_dropped():
    assert postprocess("   \n  ", prefix="x = ", suffix="", language="python", multiline=True) is None


def test_infill_entirely_repeating_suffix_dropped():
    prefix = "def f(x):\n    "
    assert postprocess("return x", prefix=prefix, suffix="\n    return x\n", language="python", multiline=False) is None


def test_large_prefix_only_the_window_matters():
    # A syntax error far above the cursor is outside the parsed window and does not matter either way.
    prefix = "def broken(:\n" + "def f(x):\n    return x + 1\n\n" * 8000 + "def g(a):\n    return "
    assert len(prefix) > 100_000
    kwargs = dict(prefix=prefix, suffix="\n\n" + prefix[:5000], language="python", multiline=False)
    assert postprocess("a * 2", **kwargs) == Candidate("a * 2")
    assert postprocess("a * * 2 )", **kwargs) is None


# ---------------------------------------------------------------- property

CODE = st.text(alphabet="ab_x1 \t\n\r():{}[]\"'`\\#;,.=+-<>", max_size=60)
ANY = st.one_of(CODE, st.text(max_size=60))


@pytest.mark.parametrize("language", LANGUAGES)
@settings(max_examples=150, deadline=None)
@given(infill=ANY, prefix=ANY, suffix=ANY, multiline=st.booleans())
def test_never_raises_and_never_blank(language, infill, prefix, suffix, multiline):
    got = postprocess(infill, prefix=prefix, suffix=suffix, language=language, multiline=multiline)
    assert got is None or isinstance(got, Candidate)
    if got is not None:
        assert got.text.strip()
        assert 0 <= got.replace_suffix <= len(suffix.split("\n", 1)[0])
        assert got.text.endswith(suffix[: got.replace_suffix])
