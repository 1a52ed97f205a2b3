"""Chinese number reading for the zh lyric cleaner.

Upstream's zh cleaner runs the default `TextNorm()` of its `zh_num2words` module: dates, money,
phone numbers, fractions, percentages, counted numbers, long digit strings and plain numbers are
spelled out in Chinese characters, in that order, then every punctuation mark becomes ",".
`normalize_chinese_numbers` does the same passes with the same patterns. Each pass finds all
matches first and then rewrites the *first occurrence* of each matched string, as upstream does,
so repeated numbers are rewritten in the same (sometimes surprising) places.
"""

from __future__ import annotations

import re
import string

DIGITS = "零一二三四五六七八九"
TWO_BEFORE_UNIT = "两"
POINT = "点"
# (power of ten, character): 十..万, then the "mid" system where every larger unit is 10^4 times
# the previous one (亿 = 10^8, 兆 = 10^12, ...). Largest first.
UNITS: tuple[tuple[int, str], ...] = tuple(
    reversed(
        [(1, "十"), (2, "百"), (3, "千"), (4, "万")]
        + [((index + 2) * 4, char) for index, char in enumerate("亿兆京垓秭穰沟涧正载")]
    )
)
TEN = "十"

_MEASURE_WORDS = (
    "匹 张 座 回 场 尾 条 个 首 阙 阵 网 炮 顶 丘 棵 只 支 袭 辆 挑 担 颗 壳 窠 曲 墙 群 腔 砣 客 贯 扎 捆 刀 令 打 "
    "手 罗 坡 山 岭 江 溪 钟 队 单 双 对 出 口 头 脚 板 跳 枝 件 贴 针 线 管 名 位 身 堂 课 本 页 家 户 层 丝 毫 厘 "
    "分 钱 两 斤 铢 石 钧 锱 忽 千克 毫克 微克 寸 尺 丈 里 寻 常 铺 程 千米 分米 厘米 毫米 微米 撮 勺 合 升 斗 盘 "
    "碗 碟 叠 桶 笼 盆 盒 杯 斛 锅 簋 篮 罐 瓶 壶 卮 盏 箩 箱 煲 啖 袋 钵 年 月 日 季 刻 时 周 天 秒 旬 纪 岁 世 更 "
    "夜 春 夏 秋 冬 代 伏 辈 丸 泡 粒 幢 堆 根 道 面 片 块"
).split()
_MEASURE_WORD = "(?:" + "|".join(sorted(_MEASURE_WORDS, key=len, reverse=True)) + ")"
# Alternatives in upstream's order: the first one that fits decides how much of the amount is read.
_MONEY_UNIT = "(?:(?:亿|千万|百万|万|千|百)|(?:亿|千万|百万|万|千|百|)元|(?:亿|千万|百万|万|千|百|)块|角|毛|分)"

_DATE = re.compile(r"\D+((?:(?:[089]\d|(?:19|20)\d{2})年)?(?:\d{1,2}月(?:\d{1,2}[日号])?)?)")
_MONEY = re.compile(r"\D+(\d+(?:\.\d+)?[多余几]?" + _MONEY_UNIT + r"(?:\d" + _MONEY_UNIT + r"?)?)")
_MOBILE = re.compile(r"\D((?:\+?86 ?)?1(?:[38]\d|5[0-35-9]|7[678]|9[89])\d{8})\D")
_LANDLINE = re.compile(r"\D((?:0(?:10|2[1-3]|[3-9]\d{2})-?)?[1-9]\d{6,7})\D")
_FRACTION = re.compile(r"(\d+/\d+)")
_PERCENT = re.compile(r"(\d+(?:\.\d+)?%)")
_COUNTED = re.compile(r"(\d+(?:\.\d+)?)[多余几]?" + _MEASURE_WORD)
_DIGIT_STRING = re.compile(r"(\d{4,32})")
_NUMBER = re.compile(r"(\d+(?:\.\d+)?)")
_NUMBER_IN_MONEY = re.compile(r"\d+(?:\.\d+)?")
_LETTERS_TWO_LETTERS = re.compile(r"([a-zA-Z]+)二([a-zA-Z]+)")

# Full-width and CJK punctuation plus ASCII punctuation, all read as a pause ",".
_CJK_PUNCTUATION = (
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃《》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿"
    "–—‘’‛“”„‟…‧﹏·〈〉-"
)
_PUNCTUATION_TO_COMMA = str.maketrans({char: "," for char in _CJK_PUNCTUATION + string.punctuation})

# Sentinels put around the text so that patterns needing a non-digit neighbour match at the ends.
_HEAD, _TAIL = "^", "$"


def _spell_with_units(value: str, units: tuple[tuple[int, str], ...] = UNITS) -> list[str]:
    """Characters of an integer string read with units: "1050" -> 一 千 零 五 十 (no 两 yet)."""
    significant = value.lstrip("0")
    if not significant:
        return []
    if len(significant) == 1:
        digit = DIGITS[int(significant)]
        return [DIGITS[0], digit] if len(significant) != len(value) else [digit]
    power, unit = next((p, u) for p, u in units if p < len(significant))
    return _spell_with_units(value[:-power], units) + [unit] + _spell_with_units(significant[-power:], units)


def read_number(number: str, *, with_units: bool = True, two_as_liang: bool = True) -> str:
    """Chinese reading of a decimal number string, e.g. "2000" -> 两千, "12.5" -> 十二点五.

    `with_units=False` reads digit by digit (phone numbers, years: "2024" -> 二零二四);
    `two_as_liang` says 两 for a 2 in front of a unit other than 十 (not after 十).
    """
    integer, dot, decimals = number.partition(".")
    if "." in decimals:
        raise ValueError(f"number {number!r} has more than one decimal point")
    if with_units and len(integer) > 1:
        chars = _spell_with_units(integer)
    else:
        chars = [DIGITS[int(c)] for c in integer]
    if decimals:
        chars += [POINT] + [DIGITS[int(c)] for c in decimals]
    if two_as_liang:
        chars = _two_as_liang(chars)
    text = "".join(chars)
    if text.startswith(POINT):
        return DIGITS[0] + text
    if text[:2] == DIGITS[1] + TEN:
        return text[1:]
    return text


def _two_as_liang(chars: list[str]) -> list[str]:
    """二 -> 两 before a unit other than 十, unless it follows 十 or a digit ("2000" -> 两千)."""
    unit_powers = {unit: power for power, unit in UNITS}
    out = list(chars)
    for index, char in enumerate(chars):
        if char != DIGITS[2]:
            continue
        following = chars[index + 1] if index + 1 < len(chars) else None
        preceding = chars[index - 1] if index > 0 else None
        before_big_unit = following in unit_powers and unit_powers[following] != 1
        after_big_unit_or_start = preceding is None or (
            preceding in unit_powers and unit_powers[preceding] != 1
        )
        if before_big_unit and after_big_unit_or_start:
            out[index] = TWO_BEFORE_UNIT
    return out


def _read_digits(number: str) -> str:
    return read_number(number, with_units=False, two_as_liang=False)


def _read_date(date: str) -> str:
    """"2024年5月1日" -> 二零二四年五月一日 (year digit by digit, month and day as numbers)."""
    year, has_year, rest = date.partition("年")
    if not has_year:
        year, rest = "", date
    else:
        year = _read_digits(year) + "年"
    if not rest:
        return year
    month, has_month, day = rest.partition("月")
    if has_month:
        month = read_number(month) + "月"
    else:
        month, day = "", date
    if day:
        day = read_number(day[:-1]) + day[-1]
    return year + month + day


def _read_money(money: str) -> str:
    for number in _NUMBER_IN_MONEY.findall(money):
        money = money.replace(number, read_number(number))
    return money


def _read_mobile(phone: str) -> str:
    return "".join(_read_digits(part) for part in phone.strip("+").split())


def _read_landline(phone: str) -> str:
    return "".join(_read_digits(part) for part in phone.split("-"))


def _read_fraction(fraction: str) -> str:
    numerator, denominator = fraction.split("/")
    return read_number(denominator) + "分之" + read_number(numerator)


def _read_percent(percent: str) -> str:
    return "百分之" + read_number(percent.strip().strip("%"))


def _rewrite_first(text: str, pattern: re.Pattern[str], read) -> str:
    for found in pattern.findall(text):
        text = text.replace(found, read(found), 1)
    return text


def normalize_chinese_numbers(text: str) -> str:
    """Spell out the numbers of a (lower-cased) zh lyric line and turn punctuation into ","."""
    text = _HEAD + text + _TAIL
    text = _rewrite_first(text, _DATE, _read_date)
    text = _rewrite_first(text, _MONEY, _read_money)
    text = _rewrite_first(text, _MOBILE, _read_mobile)
    text = _rewrite_first(text, _LANDLINE, _read_landline)
    text = _rewrite_first(text, _FRACTION, _read_fraction)
    text = _rewrite_first(text.replace("％", "%"), _PERCENT, _read_percent)
    text = _rewrite_first(text, _COUNTED, read_number)
    text = _rewrite_first(text, _DIGIT_STRING, _read_digits)
    text = _rewrite_first(text, _NUMBER, read_number)
    for letters in _LETTERS_TWO_LETTERS.finditer(text):
        text = text.replace(letters.group(0), letters.group(1) + "2" + letters.group(2), 1)
    return text.lstrip(_HEAD).rstrip(_TAIL).translate(_PUNCTUATION_TO_COMMA)


# -- Readings of the SSML tags of upstream's language segmenter ------------------------------------
# `<number>`, `<telephone>`, `<currency>` and `<date>` contents are rewritten in Chinese (with a
# different, older verbaliser: units up to 亿, no 两, only ASCII digits) before being counted as zh.
_ASCII_DIGITS = dict(zip("0123456789", DIGITS))
_SSML_UNITS: tuple[tuple[int, str], ...] = ((8, "亿"), (4, "万"), (3, "千"), (2, "百"), (1, "十"))


class UnreadableNumberError(ValueError):
    """Digits other than 0-9 in a `<currency>`/`<date>` tag, which upstream's segmenter crashes on."""


def _each_digit(text: str) -> str:
    spelled = re.sub(r"\d+", lambda m: "".join(_ASCII_DIGITS.get(c, "") for c in m.group(0)), text)
    return spelled.replace(".", POINT)


def _amount(digits: str) -> str:
    if any(c not in _ASCII_DIGITS for c in digits):
        raise UnreadableNumberError(f"non-ASCII digits in {digits!r}")
    significant = digits.lstrip("0")
    if not significant:
        return DIGITS[0]
    chars = _spell_with_units(significant, _SSML_UNITS)
    return "".join(chars[1:] if chars[:2] == [DIGITS[1], TEN] else chars)


def _amounts(text: str) -> str:
    return re.sub(r"\d+", lambda m: _amount(m.group(0)), text).replace(".", POINT)


def _with_unit(reading: str, unit: str) -> str:
    return f"{reading}{unit}" if reading not in ("", "0") else ""


def _ssml_date(text: str) -> str:
    """"2024/8/24 10:30" -> 二零二四年八月二十四日十点三十分 (year digit by digit)."""
    if not text.strip():
        return ""
    fields = re.sub(r"[\/\._|年|月]", "-", text).replace("日", "").split(" ")
    has_date = not (len(fields) == 1 and ":" in fields[0])
    time_text = fields[0] if not has_date else (fields[1] if len(fields) >= 2 else "")
    date = ""
    if has_date:
        year = month = day = ""
        parts = fields[0].split("-")
        if len(parts) == 3:
            year, month, day = parts
        elif len(parts) == 2 and len(parts[0]) == 4:
            year, month = parts
        elif len(parts) == 2:
            month, day = parts
        elif len(parts[0]) == 4:
            year = parts[0]
        else:
            day = parts[0]
        date = "".join(
            (_with_unit(_each_digit(year), "年"), _with_unit(_amounts(month), "月"), _with_unit(_amounts(day), "日"))
        )
        date = re.sub(r"([年|月|日])+", r"\1", date)
    clock = re.sub(r"[\/\.\-：_]", ":", time_text).split(":")
    hours = minutes = seconds = ""
    if len(clock) == 3:
        hours, minutes, seconds = clock
    elif len(clock) == 2:
        hours, minutes = clock
    elif clock[0]:
        hours = f"{clock[0]}点"
    if len(clock) > 1:
        hours = _with_unit(_amounts(hours), "点")
        minutes = _with_unit(_amounts(minutes), "分")
        seconds = _with_unit(_amounts(seconds), "秒")
    return date + re.sub(r"([点|分|秒])+", r"\1", hours + minutes + seconds)


SSML_READINGS = {
    "number": _each_digit,
    "telephone": lambda text: _each_digit(text.replace("+86", "")).replace(DIGITS[1], "幺"),
    "currency": _amounts,
    "date": _ssml_date,
}
