"""MediaWiki wikitext to plain text: clean_wikitext() turns an article's markup into one
paragraph or heading per line (what tool/extract_xml.py writes for each article).

Templates, notes, tables, files, categories, comments, galleries, formulas and the like go;
links become what they show, with brackets paired as MediaWiki pairs them; <nowiki> text stays as
written. Broken markup costs at most its paragraph, and every step is linear in the page, so no
page can stall a dump. Only the standard library: the data tools must not import torch.
"""

from __future__ import annotations

import html
import itertools
import re

# An unclosed comment hides the rest of the page on the wiki too.
COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.S)
# <nowiki>: its text shows as written. Its markup characters become character references
# (which html.unescape turns back after the last markup step), so no step reads them as markup.
NOWIKI = re.compile(r"<nowiki\s*>((?:[^<]|<(?!/?nowiki\b))*)</nowiki\s*>", re.I)
NOWIKI_EMPTY = re.compile(r"<nowiki\s*/>", re.I)
MARKUP_CHARACTER = re.compile(r"[\[\]{}|'<>=_~*#:;!-]")
# Elements whose content is not prose: notes, galleries, formulas, code, maps.
DROPPED_ELEMENTS = "ref|references|gallery|math|chem|ce|score|timeline|imagemap|graph|mapframe|" \
                   "templatedata|syntaxhighlight|source|pre|includeonly|indicator"
# An element's content ends at its own closing tag, and cannot hold another opening of it: an
# unclosed <ref> is plain text (as on the wiki), not the start of a span that eats the article
# up to the next note's </ref>.
DROPPED_BLOCK = re.compile(rf"<({DROPPED_ELEMENTS})\b[^>]*?(?<!/)>(?:[^<]|<(?!\1\b))*?</\1\s*>", re.S | re.I)
DROPPED_EMPTY = re.compile(rf"<(?:{DROPPED_ELEMENTS})\b[^>]*/>", re.I)
LINE_BREAK_TAG = re.compile(r"<br\s*/?>", re.I)
HTML_TAG = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*\b[^<>]*>")
TEMPLATE_BRACES = re.compile(r"\{\{|\}\}")
TABLE_MARKS = re.compile(r"^[ \t]*(\{\||\|\})", re.M)
# Neither this nor the element patterns above can run past the next opening of their kind, so
# a page full of unclosed ones costs linear time, not a scan to the end for each.
VARIANT = re.compile(r"-\{((?:[^-}]|-(?!\{)|\}(?!-))*)\}-")
VARIANT_FLAGS = re.compile(r"^\s*([A-Za-z;\-+ ]{1,10})\|")
VARIANT_PREFERENCE = ("zh-hans", "zh-cn", "zh-sg", "zh-my", "zh", "zh-hant", "zh-tw", "zh-hk", "zh-mo")
BRACKETS = re.compile(r"\[+|\]+")
INNERMOST_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
# [url label] without brackets in the label, not followed by a ] (that could end a link around it)
PLAIN_EXTERNAL_LINK = re.compile(r"\[((?:https?:)?//[^\s\[\]<>\"]+)(?:\s+([^\[\]]*))?\](?!\])")
# What makes [...] an external link: a URL right after the bracket (as MediaWiki's protocols).
EXTERNAL_URL = re.compile(r"(?:(?:https?|ftps?|sftp|irc|ircs|gopher|telnet|nntp|worldwind|svn|git|mms|ssh):)?//"
                          r"[^\s\[\]<>\"]+|(?:mailto|news|urn|magnet|tel|sms|geo|xmpp|sip|sips|bitcoin):[^\s\[\]<>\"]+",
                          re.I)
# [[fr:Paris]]: a link to the same article in another language, listed beside the page, not in it.
LANGUAGE_PREFIX = re.compile(r"(?:[a-z]{2,3}|simple)(?:-[a-z]{2,8})*")
PIPE_TRICK = re.compile(r"\s*\(.*\)\s*$")
BOLD_ITALIC = re.compile(r"'{2,}")
MAGIC_WORD = re.compile(r"__[A-Z]+__")
HEADING = re.compile(r"^(={1,6})\s*(.*?)\s*\1\s*$")
LIST_MARK = re.compile(r"^[*#:;]+\s*")
SPACES = re.compile(r"[ \t\u00a0\u3000]+")
EMPTY_PARENS = re.compile(r"\( *[,;，；、]? *\)|（ *[,;，；、]? *）")
# "(; French)" after a template that opened the brackets was removed -> "(French)"
PUNCT_AFTER_PAREN = re.compile(r"([(（]) *[,;，；、]+ *")
SPACE_BEFORE_PUNCT = re.compile(r" +([,.;:，。；：、])")
WORD = re.compile(r"\w")


def strip_nested(text: str, marks: re.Pattern, opener: str) -> str:
    """Remove every balanced region between an opening and a closing mark (nesting counted).
    A stray closing mark is dropped; an opening mark that is never closed removes the text up to
    the end of its paragraph (a blank line), so one broken template does not eat the article,
    and the text after that is read afresh. Whether a mark is ever closed is known from the
    running count of marks, so the work stays linear however many are broken."""
    found = [(match.start(), match.end(), match.group(1 if marks.groups else 0).strip() == opener)
             for match in marks.finditer(text)]
    if not found:
        return text
    # open marks minus closing marks up to each mark, and the lowest that count gets from there on:
    # the region opened at mark i closes iff the count later falls back to its value before i
    count_after = list(itertools.accumulate(1 if is_open else -1 for _, _, is_open in found))
    lowest_from = list(itertools.accumulate(reversed(count_after), min))[::-1]
    out, depth, start, skip_to = [], 0, 0, 0
    for i, (begin, end, is_open) in enumerate(found):
        if begin < skip_to:
            continue
        if depth:
            depth += 1 if is_open else -1
            if depth == 0:
                start = end
            continue
        out.append(text[start:begin])
        start = end  # a stray closing mark goes
        if is_open and lowest_from[i] < count_after[i]:
            depth = 1
        elif is_open:  # never closed: its paragraph goes
            paragraph_end = text.find("\n\n", begin)
            start = skip_to = paragraph_end if paragraph_end >= 0 else len(text)
    out.append(text[start:])
    return "".join(out)


def pick_variant(match: re.Match) -> str:
    """-{...}- Chinese variant markup: the simplified form when the text lists variants, nothing
    for a conversion rule (-{H|...}-), the text itself otherwise."""
    inner = match.group(1)
    flags = VARIANT_FLAGS.match(inner)
    if flags:
        if set(flags.group(1)) & set("H-"):
            return ""
        inner = inner[flags.end():]
    variants = {}
    for part in inner.split(";"):
        code, colon, value = part.partition(":")
        if colon and code.strip().startswith("zh"):
            variants[code.strip()] = value.strip()
    if not variants:
        return inner
    return next((variants[code] for code in VARIANT_PREFERENCE if code in variants), next(iter(variants.values())))


def hidden_link(target: str, piped: bool, dropped_prefixes: set[str]) -> bool:
    """Whether a link to `target` shows nothing: a file, image or category (unless written
    with a leading colon), or an unpiped link to another language's article."""
    target = target.strip()
    prefix, colon, _ = target.partition(":")
    if not colon or target.startswith(":"):
        return False
    return prefix.strip().lower() in dropped_prefixes or (not piped and bool(LANGUAGE_PREFIX.fullmatch(prefix)))


def link_text(inner: str, dropped_prefixes: set[str]) -> str:
    """What [[inner]] shows: [[target|label]] the label, [[target]] the target; files, images,
    categories and links to other languages nothing (a leading colon, [[:Category:X]], makes a
    plain visible link). A target over several lines is no link: its text stays."""
    target, pipe, label = inner.partition("|")
    if "\n" in target:
        return inner
    if hidden_link(target, bool(pipe), dropped_prefixes):
        return ""
    target = target.strip().lstrip(":")
    prefix, colon, rest = target.partition(":")
    if pipe and label.strip():
        return label
    if pipe:  # the pipe trick: [[Paris (band)|]] shows "Paris"
        return PIPE_TRICK.sub("", rest if colon else target)
    return target


def bracket_text(inner: str) -> str:
    """What [inner] shows: an external link [url label] its label (nothing without one), any
    other bracketed text itself, brackets included: [sic], Bicyclo[1.1.0]butane."""
    url = EXTERNAL_URL.match(inner)
    return inner[url.end():].strip() if url else f"[{inner}]"


def replace_links(text: str, dropped_prefixes: set[str]) -> str:
    """Every [[wikilink]] and [external link] replaced by what it shows, nested ones included,
    with brackets paired as MediaWiki pairs them: [[ with ]]; a single [ inside a link (an
    external link, or text such as Bicyclo[1.1.0]butane in a caption) closes with one ], and
    takes the first ] of a "]]]"; when a link's "]]" comes while such a [ is still open, the [
    was plain text. One pass over the brackets, so any input terminates. Unclosed [[ and stray
    ]] marks are dropped with the text left as it is, except that a file or category link that
    is never closed removes its own paragraph, no more; a [ still open at the end of its line
    is text (an external link cut short: its label)."""
    # Links without brackets inside, innermost first, by regular expression: what the scan
    # below would make of them, at a fraction of the cost. The scan takes what is left.
    for _ in range(3):
        text, count = INNERMOST_LINK.subn(lambda match: link_text(match.group(1), dropped_prefixes), text)
        if not count:
            break
    text = PLAIN_EXTERNAL_LINK.sub(lambda match: (match.group(2) or "").strip(), text)
    if "[" not in text and "]" not in text:
        return text
    # The page's text so far in pieces; each open bracket is (opener, index of the piece that
    # holds its mark), its text being the pieces after that one.
    out: list[str] = []
    frames: list[tuple[str, int]] = []
    open_links = 0  # frames opened by [[

    def close() -> None:
        nonlocal open_links
        opener, slot = frames.pop()
        inner = "".join(out[slot + 1:])
        del out[slot:]
        if opener == "[[":
            open_links -= 1
            out.append(link_text(inner, dropped_prefixes))
        else:
            out.append(bracket_text(inner))

    def unwind() -> None:
        """The innermost open bracket was plain text after all: only its mark changes (so a
        run of unclosed brackets costs no more than the text). The piece after the mark is
        the text up to the next bracket: a link's target, or a URL."""
        nonlocal open_links
        opener, slot = frames.pop()
        head = out[slot + 1] if slot + 1 < len(out) else ""
        if opener == "[[":
            open_links -= 1
            out[slot] = ""
            if hidden_link(head.partition("\n")[0].partition("|")[0], True, dropped_prefixes):
                inner = "".join(out[slot + 1:])  # a broken file or category link: its paragraph goes
                end = inner.find("\n\n")
                del out[slot + 1:]
                out.append(inner[end:] if end >= 0 else "")
        else:  # an external link cut short keeps its label, other text its bracket
            url = EXTERNAL_URL.match(head)
            out[slot] = "" if url else "["
            if url:
                out[slot + 1] = head[url.end():].lstrip()

    def add(piece: str) -> None:
        if frames and frames[-1][0] == "[" and "\n" in piece:  # [...] does not span lines
            line_end = piece.index("\n")
            out.append(piece[:line_end])
            while frames and frames[-1][0] == "[":
                unwind()
            piece = piece[line_end:]
        out.append(piece)

    at = 0
    for match in BRACKETS.finditer(text):
        add(text[at:match.start()])
        at = match.end()
        count = match.end() - match.start()
        if text[match.start()] == "[":
            for opener in ["[["] * (count // 2) + ["["] * (count % 2):
                frames.append((opener, len(out)))
                out.append(opener)
                open_links += opener == "[["
            continue
        while count:
            opener = frames[-1][0] if frames else ""
            if opener == "[" and count == 2 and open_links:
                while frames[-1][0] == "[":
                    unwind()
                close()
                count = 0
            elif opener == "[":
                close()
                count -= 1
            elif opener == "[[" and count >= 2:
                close()
                count -= 2
            elif opener == "[[":  # a lone ] inside a link
                out.append("]")
                count -= 1
            else:  # nothing open: a stray ]] goes, a lone ] is text
                out.append("]" * (count % 2))
                count = 0
    add(text[at:])
    while frames:
        unwind()
    return "".join(out)


def drop_empty_sections(lines: list[tuple[int, str]]) -> list[str]:
    """Lines as text, without the headings (level > 0) of sections that hold no text: a heading
    is dropped when the next thing kept is a heading of the same or a higher level, or nothing."""
    kept: list[tuple[int, str]] = []
    for level, line in reversed(lines):
        if level and (not kept or 0 < kept[-1][0] <= level):
            continue
        kept.append((level, line))
    return [line for _, line in reversed(kept)]


def clean_wikitext(text: str, dropped_prefixes: set[str]) -> str:
    """Plain text of an article's wikitext: one paragraph or heading per line."""
    text = NOWIKI.sub(lambda m: MARKUP_CHARACTER.sub(lambda c: f"&#{ord(c.group())};", m.group(1)), text)
    text = NOWIKI_EMPTY.sub("", text)
    text = COMMENT.sub("", text)
    text = DROPPED_BLOCK.sub("", text)
    text = DROPPED_EMPTY.sub("", text)
    text = strip_nested(text, TEMPLATE_BRACES, "{{")
    text = strip_nested(text, TABLE_MARKS, "{|")
    text = VARIANT.sub(pick_variant, text)
    text = replace_links(text, dropped_prefixes)
    text = LINE_BREAK_TAG.sub("\n", text)
    text = HTML_TAG.sub("", text)
    text = BOLD_ITALIC.sub("", text)
    text = MAGIC_WORD.sub("", text)
    text = html.unescape(text)  # after the last markup step: what <nowiki> held stays as written
    # the rest works within lines, but one pass over the whole text is cheaper than one per line
    text = SPACES.sub(" ", text)
    text = EMPTY_PARENS.sub("", text)
    text = PUNCT_AFTER_PAREN.sub(r"\1", text)
    text = SPACE_BEFORE_PUNCT.sub(r"\1", text)
    lines: list[tuple[int, str]] = []
    for line in text.split("\n"):
        heading = HEADING.match(line) if line.startswith("=") else None
        level = len(heading.group(1)) if heading else 0
        if heading:
            line = heading.group(2)
        elif line.lstrip().startswith(("|", "!", "----")):  # table rows left by a broken table, rules
            continue
        if line[:1] in ("*", "#", ":", ";"):
            line = LIST_MARK.sub("", line)
        line = line.strip()
        if WORD.search(line):
            lines.append((level, line))
    return "\n".join(drop_empty_sections(lines))
