"""The bundled corpora: located without importing their broken packages, markdown cleaned as
documented, cut into scene / chapter documents."""

import json
import re

from newtonlm.data import SourceConfig
from newtonlm.data.bundled import bible_documents, bible_file, play_documents, shakespeare_files
from newtonlm.data.sources import DocumentSource


def test_markdown_cleaning_rules():
    md = (
        "# A Play\n\n## ACT I  \n\n### SCENE I. A heath.\n\n"
        "_Thunder. Enter three Witches_\n\n"
        "**FIRST WITCH**  \nWhen shall we three meet again  \n\\--In thunder?\n\n"
        "**SECOND WITCH**  \n__\\[Aside]_  \nAnon, _\\[To him]_ anon.\n\n"
        "*Enter a Captain, bleeding, and\nothers.*\n\n\n\n"
        "### SCENE II. A camp.\n\n**CAPTAIN**  \nDoubtful it stood.\n\n_Exeunt_\n"
    )
    assert play_documents(md) == [
        "A Play\n\nACT I\n\nSCENE I. A heath.\n\n[Thunder. Enter three Witches]\n\n"
        "FIRST WITCH\nWhen shall we three meet again\n--In thunder?\n\n"
        "SECOND WITCH\n[Aside]\nAnon, [To him] anon.\n\n[Enter a Captain, bleeding, and others.]\n",
        "SCENE II. A camp.\n\nCAPTAIN\nDoubtful it stood.\n\n[Exeunt]\n",
    ]


def test_shakespeare_corpus():
    root, files = shakespeare_files()
    assert len(files) == 38 and (root / "tragedies" / "hamlet.md") in files
    docs = [d for f in files for d in play_documents(f.read_text(encoding="utf-8"))]
    # One document per run of header lines in the markdown (counted independently).
    header_runs = re.compile(r"(?:^#[^\n]*\n(?:\s*\n)*)+", re.M)
    runs = sum(len(header_runs.findall(f.read_text(encoding="utf-8"))) for f in files)
    assert len(docs) == runs == 783
    text = "".join(docs)
    assert 4.9e6 < len(text.encode()) < 5.1e6
    assert not re.search(r"[#_*\\]| \n", text)  # no markup left, no markdown line-break spaces
    hamlet = play_documents((root / "tragedies" / "hamlet.md").read_text(encoding="utf-8"))
    assert hamlet[0].startswith("Hamlet\n\nACT I\n\nSCENE I. Elsinore. A platform before the castle.\n\n"
                                "[FRANCISCO at his post. Enter to him BERNARDO]\n\nBERNARDO\nWho's there?\n")
    assert hamlet[1].startswith("SCENE II. A room of state in the castle.\n\n[Enter KING CLAUDIUS,")


def test_bible_chapters():
    path = bible_file()
    lines = path.read_text(encoding="utf-8").splitlines()
    verses = [json.loads(line) for line in lines if line.strip()]
    chapters = list(bible_documents(iter(lines)))
    assert len(chapters) == len({(v["book"], v["chapter"]) for v in verses}) == 1189
    assert chapters[0].startswith("Genesis 1\n\nIn the beginning God created the heaven and the earth.\n"
                                  "And the earth was without form, and void;")
    assert chapters[-1].startswith("Revelation 22\n\n")
    assert sum(c.count("\n") - 2 for c in chapters) == len(verses)  # heading + blank, one line a verse


def test_bundled_sources_read_through_the_common_path():
    bible = DocumentSource("bible", SourceConfig(kind="bible"))
    assert [f.key for f in bible.files] == ["kjv.jsonl"]
    first = next(bible.documents(split="all"))
    assert first[0] == 0 and first[1].startswith("Genesis 1\n")
    plays = DocumentSource("shakespeare", SourceConfig(kind="shakespeare"))
    assert plays.files[0].key == "comedies/a-midsummer-night-s-dream.md"
