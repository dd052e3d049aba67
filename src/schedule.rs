//! Prompt schedules: `[[prompt]] active = ["07:00-22:00", "22:30-02:00"]` (local time) and
//! `days = ["mon", "tue", ...]`. A range is `HH:MM-HH:MM`: its start is included and its end
//! excluded, and an end before the start crosses midnight. `24:00` is the end of a day.
//! `days` names the days on which a range *starts*: `days = ["fri"]` with `22:00-02:00` runs
//! Friday 22:00 to Saturday 02:00. Without `active` a prompt runs all day on its `days`, and
//! without either it always runs.
//!
//! Pure: times in (weekday and minute of the day, local), answers out; the daemon reads the
//! clock.

/// A local time of the week: `weekday` 0 = Monday … 6 = Sunday, `minute` 0 … 1439.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WeekTime {
    pub weekday: u8,
    pub minute: u16,
}

impl WeekTime {
    /// The current local time, from the system's time zone.
    pub fn now_local() -> WeekTime {
        use chrono::{Datelike, Timelike};
        let now = chrono::Local::now();
        WeekTime {
            weekday: now.weekday().num_days_from_monday() as u8,
            minute: (now.hour() * 60 + now.minute()) as u16,
        }
    }

    fn minute_of_week(&self) -> u32 {
        self.weekday as u32 * MINUTES_PER_DAY + self.minute as u32
    }

    fn from_minute_of_week(m: u32) -> WeekTime {
        let m = m % (7 * MINUTES_PER_DAY);
        WeekTime { weekday: (m / MINUTES_PER_DAY) as u8, minute: (m % MINUTES_PER_DAY) as u16 }
    }
}

const MINUTES_PER_DAY: u32 = 24 * 60;
const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// When a prompt may run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    /// (start, end) in minutes of the day; `end < start` crosses midnight.
    ranges: Vec<(u16, u16)>,
    /// Bit `d` set: ranges may start on weekday `d`.
    days: u8,
}

impl Schedule {
    /// Parse `active` and `days` as written in the config; `None` when neither restricts.
    pub fn parse(active: &[String], days: &[String]) -> Result<Option<Schedule>, String> {
        if active.is_empty() && days.is_empty() {
            return Ok(None);
        }
        let mut ranges = Vec::with_capacity(active.len());
        for r in active {
            let (a, b) = r.split_once('-').ok_or_else(|| format!("{r:?} is not a range like \"07:00-22:00\""))?;
            let (start, end) = (clock(a.trim(), false)?, clock(b.trim(), true)?);
            if start == end {
                return Err(format!("{r:?} is empty (start and end are the same)"));
            }
            ranges.push((start, end));
        }
        if ranges.is_empty() {
            ranges.push((0, MINUTES_PER_DAY as u16));
        }
        let mut mask = 0u8;
        for d in days {
            let i = DAY_NAMES
                .iter()
                .position(|n| d.trim().to_ascii_lowercase().starts_with(n))
                .ok_or_else(|| format!("{d:?} is not a day (mon, tue, wed, thu, fri, sat, sun)"))?;
            mask |= 1 << i;
        }
        Ok(Some(Schedule { ranges, days: if days.is_empty() { 0x7f } else { mask } }))
    }

    fn starts_on(&self, weekday: u8) -> bool {
        self.days & (1 << (weekday % 7)) != 0
    }

    /// Whether the prompt may run at `t`.
    pub fn is_active(&self, t: WeekTime) -> bool {
        let yesterday = (t.weekday + 6) % 7;
        self.ranges.iter().any(|&(start, end)| {
            if start < end {
                self.starts_on(t.weekday) && (start..end).contains(&t.minute)
            } else {
                (t.minute >= start && self.starts_on(t.weekday)) || (t.minute < end && self.starts_on(yesterday))
            }
        })
    }

    /// The next time after `t` at which [`Schedule::is_active`] changes, if it ever does.
    pub fn next_change(&self, t: WeekTime) -> Option<WeekTime> {
        let now = self.is_active(t);
        let m0 = t.minute_of_week();
        (1..=7 * MINUTES_PER_DAY).map(|d| WeekTime::from_minute_of_week(m0 + d)).find(|&u| self.is_active(u) != now)
    }

    /// Minutes from `a` to `b` going forward (0 … one week).
    pub fn minutes_between(a: WeekTime, b: WeekTime) -> u32 {
        (b.minute_of_week() + 7 * MINUTES_PER_DAY - a.minute_of_week()) % (7 * MINUTES_PER_DAY)
    }
}

/// `HH:MM` as minutes of the day; `24:00` only as an end.
fn clock(s: &str, is_end: bool) -> Result<u16, String> {
    let bad = || format!("{s:?} is not a time like \"07:30\"");
    let (h, m) = s.split_once(':').ok_or_else(bad)?;
    let (h, m): (u16, u16) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if m >= 60 || h > 24 || (h == 24 && (m != 0 || !is_end)) {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(weekday: u8, hhmm: &str) -> WeekTime {
        WeekTime { weekday, minute: clock(hhmm, false).unwrap() }
    }

    fn sched(active: &[&str], days: &[&str]) -> Schedule {
        let own = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        Schedule::parse(&own(active), &own(days)).unwrap().unwrap()
    }

    #[test]
    fn day_ranges_include_the_start_and_exclude_the_end() {
        let s = sched(&["07:00-22:00"], &[]);
        assert!(!s.is_active(at(0, "06:59")));
        assert!(s.is_active(at(0, "07:00")));
        assert!(s.is_active(at(3, "21:59")));
        assert!(!s.is_active(at(3, "22:00")));
        assert_eq!(s.next_change(at(0, "12:00")), Some(at(0, "22:00")));
        assert_eq!(s.next_change(at(0, "23:00")), Some(at(1, "07:00")));
    }

    #[test]
    fn a_range_across_midnight_belongs_to_the_day_it_starts() {
        let s = sched(&["22:00-02:00"], &["fri"]);
        assert!(!s.is_active(at(4, "21:59")), "friday before");
        assert!(s.is_active(at(4, "23:30")), "friday night");
        assert!(s.is_active(at(5, "01:59")), "saturday small hours: friday's range");
        assert!(!s.is_active(at(5, "02:00")));
        assert!(!s.is_active(at(5, "23:00")), "saturday night is not friday");
        assert!(!s.is_active(at(4, "01:00")), "friday small hours belong to thursday");
        assert_eq!(s.next_change(at(5, "01:00")), Some(at(5, "02:00")));
        assert_eq!(s.next_change(at(5, "03:00")), Some(at(4 + 7 - 7, "22:00")), "next friday");
        assert_eq!(Schedule::minutes_between(at(5, "03:00"), at(4, "22:00")), 6 * 1440 + 19 * 60);
    }

    #[test]
    fn days_alone_and_several_ranges() {
        let weekend = sched(&[], &["sat", "Sunday"]);
        assert!(weekend.is_active(at(5, "00:00")) && weekend.is_active(at(6, "23:59")));
        assert!(!weekend.is_active(at(0, "12:00")));
        let s = sched(&["06:00-08:00", "18:00-24:00"], &[]);
        assert!(s.is_active(at(2, "07:00")) && s.is_active(at(2, "23:59")) && !s.is_active(at(2, "12:00")));
        let always = sched(&["00:00-24:00"], &[]);
        assert_eq!(always.next_change(at(0, "00:00")), None);
    }

    #[test]
    fn bad_schedules_say_what_is_wrong() {
        let own = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(Schedule::parse(&[], &[]).unwrap().is_none());
        for (active, days, want) in [
            (&["7-22"][..], &[][..], "not a time"),
            (&["07:00"][..], &[][..], "not a range"),
            (&["25:00-26:00"][..], &[][..], "not a time"),
            (&["24:00-02:00"][..], &[][..], "not a time"),
            (&["07:00-07:00"][..], &[][..], "empty"),
            (&["07:00-08:00"][..], &["funday"][..], "not a day"),
        ] {
            let e = Schedule::parse(&own(active), &own(days)).unwrap_err();
            assert!(e.contains(want), "{active:?} {days:?}: {e}");
        }
    }
}
