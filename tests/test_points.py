"""Points: the §6 forms parse, formatting round-trips, garbage never raises, pixels, drawing."""
import re

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image

from molmoe.points import (PointGroup, PointsFormatError, check_points, draw_points, format_count,
                           format_points, parse_points, to_pixels)

SPEC_EXAMPLES = [
    ('<point x="61.5" y="40.6" alt="dog">dog</point>', [(61.5, 40.6)], "dog", "dog", None),
    ('<points x1="10.2" y1="30.0" x2="55.0" y2="31.4" alt="dogs">dogs</points>',
     [(10.2, 30.0), (55.0, 31.4)], "dogs", "dogs", None),
    ('Counting the <points x1="10.2" y1="30.0" x2="55.0" y2="31.4" x3="70.0" y3="5.5" '
     'alt="dogs">dogs</points> shows a total of 3.',
     [(10.2, 30.0), (55.0, 31.4), (70.0, 5.5)], "dogs", "dogs", 3),
    ('Counting the <point x="5.0" y="100.0" alt="cat">cat</point> shows a total of 1.',
     [(5.0, 100.0)], "cat", "cat", 1),
]


@pytest.mark.parametrize("text,points,alt,body,count", SPEC_EXAMPLES)
def test_spec_examples_parse(text, points, alt, body, count):
    ans = parse_points(text)
    assert len(ans.groups) == 1
    g = ans.groups[0]
    assert list(g.points) == points and g.alt == alt and g.text == body and g.complete
    assert ans.count == count


def test_none_and_inline_and_alt_text():
    assert parse_points("There are none.").count == 0
    assert parse_points("There are none.").groups == ()
    text = ('The <point x="20.0" y="30.0" alt="a red mug on the table">mug</point> is left of '
            'the <point x="70.5" y="31.0" alt="laptop">computer</point>.')
    ans = parse_points(text)
    assert [g.alt for g in ans.groups] == ["a red mug on the table", "laptop"]
    assert [g.text for g in ans.groups] == ["mug", "computer"]
    assert [g.label for g in ans.groups] == ["a red mug on the table", "laptop"]
    assert ans.points == [(20.0, 30.0), (70.5, 31.0)] and ans.count is None


def test_out_of_range_points_are_dropped_and_truncation_keeps_what_was_read():
    ans = parse_points('<points x1="10.0" y1="20.0" x2="100.1" y2="5.0" x3="3.0" y3="4.0" '
                       'alt="x">x</points>')
    assert ans.points == [(10.0, 20.0), (3.0, 4.0)]
    cut = parse_points('Counting the <points x1="10.0" y1="20.0" x2="30.5" y2="4')
    assert cut.points == [(10.0, 20.0)] and not cut.groups[0].complete and cut.count is None
    cut = parse_points('<point x="1.0" y="2.0" alt="do')
    assert cut.groups[0].points == ((1.0, 2.0),) and cut.groups[0].alt == "do"
    assert parse_points("a total of three").count == 3
    assert parse_points("a total of " + "9" * 5000 + ".").count is None  # too long for int()


_label = st.text(st.characters(blacklist_characters='"<>', blacklist_categories=("Cs",)),
                 min_size=1, max_size=20)
_pct = st.floats(min_value=0.0, max_value=100.0, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_pct, _pct), min_size=1, max_size=8), _label)
def test_format_round_trip(points, label):
    text = format_points(points, label)
    expected = sorted(((float(f"{x:.1f}"), float(f"{y:.1f}")) for x, y in points),
                      key=lambda p: p[0] * 10000 + p[1])
    assert text.startswith("<point " if len(points) == 1 else "<points ")
    if len(points) > 1:
        ks = [int(k) for k in re.findall(r' x(\d+)="', text)]
        assert ks == list(range(1, len(points) + 1))  # k = 1.. consecutively
    ans = parse_points(text)
    assert len(ans.groups) == 1
    assert list(ans.groups[0].points) == expected
    assert ans.groups[0].alt == label and ans.groups[0].text == label
    counted = parse_points(format_count(points, label))
    assert counted.count == len(points) and counted.points == expected


def test_formatter_matches_official_layout():
    assert format_points([(55.04, 31.36), (10.2, 30)], "dogs") == (
        '<points x1="10.2" y1="30.0" x2="55.0" y2="31.4" alt="dogs">dogs</points>')
    assert format_points([(61.5, 40.6)], "dog") == '<point x="61.5" y="40.6" alt="dog">dog</point>'
    # Same x: sorted by y.
    assert format_points([(5, 9), (5, 1)], "a").startswith('<points x1="5.0" y1="1.0" x2="5.0"')
    assert format_count([], "dogs") == "There are none."
    with pytest.raises(ValueError, match="label"):
        format_points([(1, 2)], 'bad"label')
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        format_points([(101, 2)], "a")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list('<>/="xy0123456789. pointsalt\'aghz\n')) |
               st.characters(), max_size=200))
def test_garbage_never_raises(text):
    ans = parse_points(text)
    for x, y in ans.points:
        assert 0.0 <= x <= 100.0 and 0.0 <= y <= 100.0


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(_pct, _pct), min_size=0, max_size=5), _label, st.data())
def test_every_truncation_of_a_valid_answer_parses(points, label, data):
    text = "Sure. " + format_count(points, label) + " Done."
    cut = data.draw(st.integers(0, len(text)))
    ans = parse_points(text[:cut])
    full = parse_points(text).points
    # Whatever was read from a prefix is a prefix of what the whole answer holds.
    assert ans.points == full[: len(ans.points)]


def test_pixel_conversion():
    assert to_pixels([(50.0, 25.0), (0.0, 100.0)], (640, 480)) == [(320.0, 120.0), (0.0, 480.0)]
    g = PointGroup(((10.0, 10.0),), "a", "a")
    assert g.pixels((200, 100)) == [(20.0, 10.0)]


def test_drawing_marks_points_and_leaves_original_untouched():
    for bg in ((0, 0, 0), (255, 255, 255), (255, 0, 200)):  # dark, light, the marker colour
        img = Image.new("RGB", (200, 100), bg)
        before = np.asarray(img).copy()
        groups = parse_points('<points x1="25.0" y1="50.0" x2="75.0" y2="20.0" alt="obj">obj'
                              '</points>').groups
        out = draw_points(img, groups)
        assert np.array_equal(np.asarray(img), before)  # original untouched
        arr = np.asarray(out).astype(int)
        for px, py in groups[0].pixels(img.size):
            # The point's neighbourhood holds colours other than the background.
            patch = arr[int(py) - 4: int(py) + 5, int(px) - 4: int(px) + 5]
            assert (np.abs(patch - np.array(bg)).sum(-1) > 100).any()
        far = arr[95:100, 0:5]  # a corner far from every marker and label
        assert (far == np.array(bg)).all()


def official_style(points, label, count_style=False):
    """The official data formatter's output, written here from spec §6 (independently of
    molmoe.points): percentages rounded to 1 decimal with round(), sorted by x*10000 + y,
    printed "%.1f", `<point>` for one and numbered `<points>` for several, label as alt and text;
    the point_count style wraps it as "Counting the ... shows a total of N." / "There are none."."""
    if not points:
        return "There are none."
    pts = sorted(([round(x, 1), round(y, 1)] for x, y in points), key=lambda p: p[0] * 10000 + p[1])
    if len(pts) == 1:
        tag = '<point x="%.1f" y="%.1f" alt="%s">%s</point>' % (pts[0][0], pts[0][1], label, label)
    else:
        coords = " ".join('x%d="%.1f" y%d="%.1f"' % (k, x, k, y) for k, (x, y) in
                          enumerate(pts, start=1))
        tag = '<points %s alt="%s">%s</points>' % (coords, label, label)
    return f"Counting the {tag} shows a total of {len(pts)}." if count_style else tag


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_pct, _pct), min_size=0, max_size=8), _label, st.booleans())
def test_official_formatter_output_round_trips(points, label, count_style):
    text = official_style(points, label, count_style)
    if points:
        assert format_points(points, label) == official_style(points, label)  # same bytes
    if count_style or not points:
        assert format_count(points, label) == official_style(points, label, True)
    ans = parse_points(text)
    want = sorted(((round(x, 1), round(y, 1)) for x, y in points), key=lambda p: p[0] * 10000 + p[1])
    assert ans.points == want
    if points:
        assert len(ans.groups) == 1 and ans.groups[0].alt == label == ans.groups[0].text
    assert ans.count == (len(points) if (count_style or not points) else None)


# ----------------------------------------------------------------------------- strict grammar


STRICT_OK = [
    "There are none.", "plain text, no tags", format_points([(61.5, 40.6)], "dog"),
    format_points([(10.2, 30.0), (55.0, 31.4), (0.0, 100.0)], "dogs"),
    format_count([(1.0, 2.0)], "cat"), format_count([(1.0, 2.0), (3.0, 4.0)], "cats"),
    'In the <point x="5.0" y="7.5" alt="a red spot">spot</point> and a pointer.',
]
STRICT_BAD = [
    ('<point x="61" y="40.6" alt="d">d</point>', 'x="61" is not a percentage'),
    ('<point x="61.55" y="40.6" alt="d">d</point>', 'x="61.55" is not a percentage'),
    ('<point x="01.0" y="40.6" alt="d">d</point>', 'x="01.0" is not a percentage'),
    ('<point x="1.0" y="100.1" alt="d">d</point>', 'y="100.1" is above 100'),
    ('<points x1="1.0" y1="2.0" alt="d">d</points>', "at least 2 points"),
    ('<points x1="1.0" y1="2.0" x3="1.0" y3="2.0" alt="d">d</points>', "x1 y1 x2 y2 alt"),
    ('<point y="1.0" x="2.0" alt="d">d</point>', "x y alt in this order"),
    ('<point x="1.0" y="2.0">d</point>', "x y alt in this order"),
    ('<point x="1.0" y="2.0" alt="d">d', "unclosed"),
    ('<point x="1.0" y="2.0" alt="d">d</points>', "closed by </points>"),
    ('<point x="1.0" y="2.0" alt="">d</point>', "empty alt"),
    ('<point x="1.0" y="2.0" alt="d"></point>', "empty text"),
    ('<POINT x="1.0" y="2.0" alt="d">d</POINT>', "malformed"),
    ("a stray </point> tag", "malformed"),
    ("Counting the " + format_points([(1.0, 2.0), (3.0, 4.0)], "c") + " shows a total of 3.",
     "the count says 3 but its tag holds 2 points"),
    ("Counting the " + format_points([(1.0, 2.0)], "c") + " makes one.", "a count must read"),
    ("Counting the <b>x</b> shows a total of 1.", "must be followed by a point tag"),
]


@pytest.mark.parametrize("text", STRICT_OK)
def test_check_points_accepts_the_grammar(text):
    check_points(text)


@pytest.mark.parametrize("text,words", STRICT_BAD)
def test_check_points_quotes_what_breaks_it(text, words):
    with pytest.raises(PointsFormatError) as info:
        check_points(text)
    assert words in str(info.value)
