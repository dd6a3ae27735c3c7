from gemma_qlora.fortunes import clean_author, load_fortunes, parse_entry, parse_fortunes


def test_real_file_parses_to_about_5200_records():
    records = load_fortunes()
    assert 5000 < len(records) < 5500
    assert all(r["quote"] and r["author"] for r in records)
    authors = {r["author"] for r in records}
    assert {"Mark Twain", "Oscar Wilde", "Dave Barry"} <= authors


def test_attributed_entry():
    entry = (
        "\tIn the beginning the Universe was created.  This has made a lot\n"
        "of people very angry and been widely regarded as a bad move.\n"
        '\t\t-- Douglas Adams, "The Restaurant at the End of the Universe"'
    )
    assert parse_entry(entry) == {
        "quote": "In the beginning the Universe was created. This has made a lot of people very angry and been widely regarded as a bad move.",
        "author": "Douglas Adams",
    }


def test_attribution_with_continuation_line():
    entry = "How to keep people from hanging out.\n\t\t-- Sister Mary Elephant,\n\t\t   \"Student Statement for Black Friday\""
    assert parse_entry(entry)["author"] == "Sister Mary Elephant"


def test_skipped_entries():
    no_attribution = "Auntie Em:\n\tHate you.\n\tHate Kansas.\n\t\tDorothy"
    too_long = "word " * 100 + "\n\t\t-- Someone"
    dash_inside_text = "Frogs are Pond-space complete -- that is to say\nthey are fast."
    assert parse_entry(no_attribution) is None
    assert parse_entry(too_long) is None
    assert parse_entry(dash_inside_text) is None
    text = "\n%\n".join([no_attribution, "Be yourself.\n\t\t-- Oscar Wilde", too_long])
    assert parse_fortunes(text) == [{"quote": "Be yourself.", "author": "Oscar Wilde"}]


def test_clean_author():
    assert clean_author('"InfoWorld", June, 1984') == "InfoWorld"
    assert clean_author("Guy L. Steele, Jr., (C) 1978") == "Guy L. Steele"
    assert clean_author("Mark Twain") == "Mark Twain"


def test_offensive_file_not_used():
    from gemma_qlora.fortunes import fortunes_file

    assert fortunes_file().name == "fortunes"
