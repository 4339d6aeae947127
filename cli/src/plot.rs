//! PNG line charts for training reports: one chart per metric, a line per
//! series, dashed vertical markers where stages begin.
//!
//! Text is drawn with a font bundled in the binary (`assets/DejaVuSans.ttf`,
//! licence next to it), so charts render the same on a bare machine with no
//! system fonts or fontconfig. The bitmap is encoded with `png` rather than
//! plotters' `image` encoder; see the root `Cargo.toml` for why.

use std::fs::File;
use std::io::BufWriter;
use std::ops::Range;
use std::path::Path;
use std::sync::OnceLock;

use anyhow::{Context, ensure};
use plotters::backend::{BitMapBackend, RGBPixel};
use plotters::chart::{ChartBuilder, SeriesLabelPosition};
use plotters::drawing::IntoDrawingArea;
use plotters::element::{Circle, EmptyElement, PathElement, Text};
use plotters::series::{DashedLineSeries, LineSeries};
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{BLACK, Color, FontStyle, IntoFont, RGBColor, TRANSPARENT, TextStyle, WHITE};

/// One named line of points (x, y); NaN y values are gaps, skipped.
///
/// Any point with a coordinate that is not finite, or past ±1e300, is a
/// gap: a diverged run's infinities would flatten the rest of the chart, and
/// plotters cannot map values near f64::MAX to pixels (the span overflows).
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// A vertical marker, e.g. where a training stage begins.
#[derive(Debug, Clone, PartialEq)]
pub struct Marker {
    pub x: f64,
    pub label: String,
}

/// What to draw: titles, lines and markers.
#[derive(Debug, Clone, Copy)]
pub struct Chart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub series: &'a [Series],
    pub markers: &'a [Marker],
}

const WIDTH: u32 = 900;
const HEIGHT: u32 = 500;
/// Each axis extends this fraction of the data's span past either end, so
/// extreme points do not sit on the frame.
const MARGIN: f64 = 0.05;
/// Coordinates past this magnitude are gaps; see `Series`.
const LIMIT: f64 = 1e300;
/// plotters looks fonts up by family name; its own default text (tick
/// labels, legend) asks for "sans-serif", so the bundled font takes that name.
const FAMILY: &str = "sans-serif";
const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// Tableau 10 without its grey, which is kept for markers: distinct for the
/// first nine series, repeating after that.
const PALETTE: [RGBColor; 9] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];
/// Text size of tick labels, marker labels and the legend, and the rough
/// advance of one of its characters, for guessing how wide a label is.
const SMALL_TEXT: u32 = 13;
const CHAR_PX: f64 = 7.5;
const MARKER_COLOUR: RGBColor = RGBColor(100, 100, 100);
const NOTE_COLOUR: RGBColor = RGBColor(150, 150, 150);

/// Writes `chart` as a PNG (about 900x500) to `path`; errors name the path.
pub fn write_png(path: &Path, chart: &Chart<'_>) -> anyhow::Result<()> {
    render(chart)
        .and_then(|pixels| encode(path, &pixels))
        .with_context(|| format!("writing chart {}", path.display()))
}

/// Registers the bundled font with plotters, once per process.
fn register_font() -> anyhow::Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED
        .get_or_init(|| plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_ok());
    ensure!(ok, "the bundled font assets/DejaVuSans.ttf does not parse");
    Ok(())
}

/// Draws the chart into an RGB buffer, `WIDTH * HEIGHT * 3` bytes.
fn render(chart: &Chart<'_>) -> anyhow::Result<Vec<u8>> {
    register_font()?;
    let (x_range, y_range, has_data) = axis_ranges(chart.series, chart.markers);
    let mut pixels = vec![0u8; WIDTH as usize * HEIGHT as usize * 3];
    {
        let backend =
            BitMapBackend::<RGBPixel>::with_buffer_and_format(&mut pixels, (WIDTH, HEIGHT))?;
        let root = backend.into_drawing_area();
        root.fill(&WHITE)?;
        let mut ctx = ChartBuilder::on(&root)
            .caption(chart.title, (FAMILY, 22))
            .margin(12)
            .x_label_area_size(48)
            .y_label_area_size(72)
            .build_cartesian_2d(x_range.clone(), y_range.clone())?;
        ctx.configure_mesh()
            .x_desc(chart.x_label)
            .y_desc(chart.y_label)
            .label_style((FAMILY, SMALL_TEXT))
            .axis_desc_style((FAMILY, 15))
            .light_line_style(TRANSPARENT)
            .draw()?;

        let x_mid = (x_range.start + x_range.end) / 2.0;
        for marker in chart.markers.iter().filter(|m| plottable(m.x)) {
            ctx.draw_series(DashedLineSeries::new(
                [(marker.x, y_range.start), (marker.x, y_range.end)],
                6,
                4,
                MARKER_COLOUR.stroke_width(1),
            ))?;
            // Labels right of the line in the left half, left of it in the
            // right half, so they stay inside the frame.
            let (h_pos, dx) = if marker.x <= x_mid {
                (HPos::Left, 4)
            } else {
                (HPos::Right, -4)
            };
            let style = TextStyle::from((FAMILY, SMALL_TEXT).into_font())
                .color(&MARKER_COLOUR)
                .pos(Pos::new(h_pos, VPos::Top));
            ctx.draw_series(std::iter::once(
                EmptyElement::at((marker.x, y_range.end))
                    + Text::new(marker.label.clone(), (dx, 4), style),
            ))?;
        }

        for (i, series) in chart.series.iter().enumerate() {
            let colour = PALETTE[i % PALETTE.len()];
            for run in plottable_runs(&series.points) {
                if let [point] = run {
                    // A lone point has no segment to draw.
                    ctx.draw_series(std::iter::once(Circle::new(*point, 3, colour.filled())))?;
                } else {
                    ctx.draw_series(LineSeries::new(run.iter().copied(), colour.stroke_width(2)))?;
                }
            }
            // The legend entry is its own empty series, so that a series
            // with no points, or with gaps, still gets exactly one.
            ctx.draw_series(std::iter::empty::<PathElement<(f64, f64)>>())?
                .label(series.name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 20, y)], colour.stroke_width(2))
                });
        }
        if chart.series.len() > 1 {
            let corner = legend_corner(
                chart,
                (&x_range, &y_range),
                ctx.plotting_area().dim_in_pixel(),
            );
            ctx.configure_series_labels()
                .position(corner)
                .label_font((FAMILY, SMALL_TEXT))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()?;
        }

        if !has_data {
            let style = TextStyle::from((FAMILY, 18).into_font())
                .color(&NOTE_COLOUR)
                .pos(Pos::new(HPos::Center, VPos::Center));
            let centre = (x_mid, (y_range.start + y_range.end) / 2.0);
            ctx.draw_series(std::iter::once(Text::new("no data", centre, style)))?;
        }
        root.present()?;
    }
    Ok(pixels)
}

/// Writes an RGB buffer of `WIDTH x HEIGHT` as a PNG file.
fn encode(path: &Path, pixels: &[u8]) -> anyhow::Result<()> {
    let file = File::create(path)?;
    let mut encoder = png::Encoder::new(BufWriter::new(file), WIDTH, HEIGHT);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(pixels)?;
    writer.finish()?;
    Ok(())
}

/// Whether plotters can place `v`: finite and within `±LIMIT`.
fn plottable(v: f64) -> bool {
    v.abs() <= LIMIT
}

/// The stretches of `points` between gaps (points with a coordinate that
/// is not `plottable`), each non-empty.
fn plottable_runs(points: &[(f64, f64)]) -> impl Iterator<Item = &[(f64, f64)]> {
    points
        .split(|&(x, y)| !(plottable(x) && plottable(y)))
        .filter(|run| !run.is_empty())
}

/// The x and y ranges to plot, and whether there is any plottable point.
///
/// x covers the plottable points and markers, y the plottable points; both
/// padded by `MARGIN`. Without data an axis falls back to 0..1.
fn axis_ranges(series: &[Series], markers: &[Marker]) -> (Range<f64>, Range<f64>, bool) {
    let points = || {
        series
            .iter()
            .flat_map(|s| plottable_runs(&s.points))
            .flatten()
    };
    let xs = points().map(|&(x, _)| x).chain(markers.iter().map(|m| m.x));
    let ys = points().map(|&(_, y)| y);
    let y = extent(ys);
    let has_data = y.is_some();
    let fallback = 0.0..1.0;
    let x_range = extent(xs).map_or(fallback.clone(), padded);
    let y_range = y.map_or(fallback, padded);
    (x_range, y_range, has_data)
}

/// The corner for the legend that hides least: points under its box, and
/// marker labels (along the top), each worth a tenth of all the points, as a
/// line under the half-transparent legend stays visible and a label does
/// not. Ties go to the upper right.
fn legend_corner(
    chart: &Chart<'_>,
    (x, y): (&Range<f64>, &Range<f64>),
    (width_px, height_px): (u32, u32),
) -> SeriesLabelPosition {
    // Positions and sizes as fractions of the plotting area.
    let fx = |v: f64| (v - x.start) / (x.end - x.start);
    let fy = |v: f64| (v - y.start) / (y.end - y.start);
    let (width_px, height_px) = (f64::from(width_px.max(1)), f64::from(height_px.max(1)));
    let text_width = |text: &str| text.chars().count() as f64 * CHAR_PX / width_px;
    // plotters' legend: a 20 px swatch, the names, 5 px padding, and a row
    // per series of about 1.4 lines.
    let longest = chart
        .series
        .iter()
        .map(|s| text_width(&s.name))
        .fold(0.0, f64::max);
    let box_w = longest + 40.0 / width_px;
    let box_h = (10.0 + chart.series.len() as f64 * 1.4 * f64::from(SMALL_TEXT)) / height_px;

    let points: Vec<(f64, f64)> = chart
        .series
        .iter()
        .flat_map(|s| plottable_runs(&s.points))
        .flatten()
        .map(|&(px, py)| (fx(px), fy(py)))
        .collect();
    // Label spans along x, drawn as in `render`: right of the line in the
    // left half, left of it in the right half.
    let labels: Vec<(f64, f64)> = chart
        .markers
        .iter()
        .filter(|m| plottable(m.x))
        .map(|m| {
            let (at, w) = (fx(m.x), text_width(&m.label));
            if at <= 0.5 {
                (at, at + w)
            } else {
                (at - w, at)
            }
        })
        .collect();
    let label_weight = points.len() as f64 / 10.0 + 1.0;

    let corners = [
        (SeriesLabelPosition::UpperRight, true, true),
        (SeriesLabelPosition::UpperLeft, false, true),
        (SeriesLabelPosition::LowerRight, true, false),
        (SeriesLabelPosition::LowerLeft, false, false),
    ];
    corners
        .into_iter()
        .map(|(corner, right, upper)| {
            let xs = if right { 1.0 - box_w..1.0 } else { 0.0..box_w };
            let ys = if upper { 1.0 - box_h..1.0 } else { 0.0..box_h };
            let hidden = points
                .iter()
                .filter(|(px, py)| xs.contains(px) && ys.contains(py))
                .count();
            let hidden_labels = if upper {
                labels
                    .iter()
                    .filter(|(a, b)| *a < xs.end && *b > xs.start)
                    .count()
            } else {
                0
            };
            (corner, hidden as f64 + hidden_labels as f64 * label_weight)
        })
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map_or(SeriesLabelPosition::UpperRight, |(corner, _)| corner)
}

/// The smallest and largest plottable values, if there are any.
fn extent(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    values
        .filter(|&v| plottable(v))
        .fold(None, |acc, v| match acc {
            None => Some((v, v)),
            Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
        })
}

/// `lo..hi` widened by `MARGIN` of its span on each side, or, when all
/// values are equal, by `MARGIN` of their magnitude (1 for zero), so a flat
/// line is drawn inside the frame rather than on it. `lo` and `hi` are
/// `plottable`, so the result is finite.
fn padded((lo, hi): (f64, f64)) -> Range<f64> {
    let span = hi - lo;
    let margin = if span > 0.0 {
        span * MARGIN
    } else {
        lo.abs() * MARGIN
    };
    // Flat at zero (or at a subnormal) has no magnitude to take a margin from.
    let margin = if margin > 0.0 { margin } else { 1.0 };
    lo - margin..hi + margin
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes a PNG file to (width, height, RGB bytes).
    fn decode(path: &Path) -> (u32, u32, Vec<u8>) {
        let file = File::open(path).expect("open png");
        let decoder = png::Decoder::new(std::io::BufReader::new(file));
        let mut reader = decoder.read_info().expect("png header");
        let size = reader.output_buffer_size().expect("buffer size");
        let mut buf = vec![0; size];
        let info = reader.next_frame(&mut buf).expect("png frame");
        assert_eq!(info.color_type, png::ColorType::Rgb);
        assert_eq!(info.bit_depth, png::BitDepth::Eight);
        buf.truncate(info.buffer_size());
        (info.width, info.height, buf)
    }

    /// How many pixels are exactly `colour`.
    fn count(pixels: &[u8], colour: RGBColor) -> usize {
        pixels
            .chunks_exact(3)
            .filter(|p| p == &[colour.0, colour.1, colour.2])
            .count()
    }

    fn series(name: &str, points: &[(f64, f64)]) -> Series {
        Series {
            name: name.to_string(),
            points: points.to_vec(),
        }
    }

    fn write(series: &[Series], markers: &[Marker]) -> (u32, u32, Vec<u8>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("chart.png");
        let chart = Chart {
            title: "Reward",
            x_label: "step",
            y_label: "mean reward",
            series,
            markers,
        };
        write_png(&path, &chart).expect("write chart");
        decode(&path)
    }

    #[test]
    fn two_series_and_a_marker_draw_both_lines() {
        let train: Vec<_> = (0..50)
            .map(|i| (i as f64, (i as f64 * 0.2).sin()))
            .collect();
        let eval: Vec<_> = (0..50)
            .map(|i| (i as f64, 0.5 - i as f64 / 100.0))
            .collect();
        let (width, height, pixels) = write(
            &[series("train", &train), series("eval", &eval)],
            &[Marker {
                x: 20.0,
                label: "stage 2".to_string(),
            }],
        );
        assert_eq!((width, height), (WIDTH, HEIGHT));
        assert!(
            count(&pixels, WHITE) > pixels.len() / 6,
            "mostly white background"
        );
        // Lines are two pixels wide and dozens long; the legend's swatches
        // alone are 20 pixels.
        assert!(count(&pixels, PALETTE[0]) > 200, "first series drawn");
        assert!(count(&pixels, PALETTE[1]) > 200, "second series drawn");
        assert!(count(&pixels, MARKER_COLOUR) > 50, "marker drawn");
    }

    #[test]
    fn png_on_disk_has_the_signature_and_size() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.png");
        let chart = Chart {
            title: "t",
            x_label: "x",
            y_label: "y",
            series: &[],
            markers: &[],
        };
        write_png(&path, &chart).expect("write chart");
        let bytes = std::fs::read(&path).expect("read png");
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(&bytes[12..16], b"IHDR");
        assert_eq!(
            u32::from_be_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]),
            WIDTH
        );
        assert_eq!(
            u32::from_be_bytes([bytes[20], bytes[21], bytes[22], bytes[23]]),
            HEIGHT
        );
    }

    #[test]
    fn empty_and_missing_series_still_write_a_chart() {
        let (w, h, pixels) = write(&[series("loss", &[])], &[]);
        assert_eq!((w, h), (WIDTH, HEIGHT));
        assert!(count(&pixels, NOTE_COLOUR) > 20, "no-data note drawn");
        let (_, _, none) = write(
            &[],
            &[Marker {
                x: 3.0,
                label: "start".to_string(),
            }],
        );
        assert!(
            count(&none, MARKER_COLOUR) > 50,
            "marker drawn without data"
        );
        let (_, _, nan) = write(&[series("a", &[(0.0, f64::NAN)]), series("b", &[])], &[]);
        // Two series without a finite point: a legend swatch each, no line.
        let swatch = count(&nan, PALETTE[0]);
        assert!(swatch > 0 && swatch < 100, "{swatch} pixels");
        assert_eq!(swatch, count(&nan, PALETTE[1]));
    }

    #[test]
    fn flat_and_single_point_series_are_drawn_inside_the_frame() {
        let (_, _, flat) = write(
            &[series("kl", &[(0.0, 0.3), (10.0, 0.3), (20.0, 0.3)])],
            &[],
        );
        assert!(count(&flat, PALETTE[0]) > 200, "flat line drawn");
        let (_, _, zero) = write(&[series("kl", &[(0.0, 0.0), (10.0, 0.0)])], &[]);
        assert!(count(&zero, PALETTE[0]) > 200, "flat line at zero drawn");
        let (_, _, one) = write(&[series("kl", &[(5.0, 1.0)])], &[]);
        assert!(count(&one, PALETTE[0]) > 10, "lone point drawn");
    }

    #[test]
    fn extreme_values_are_gaps() {
        // Ranges reaching f64::MAX once hung plotters (an infinite span) or
        // overflowed its pixel arithmetic.
        let huge = [(0.0, f64::MAX), (f64::MIN, 1.0), (2.0, 1e301)];
        let marker = [Marker {
            x: f64::MAX,
            label: "never".to_string(),
        }];
        let (_, _, pixels) = write(&[series("huge", &huge)], &marker);
        assert_eq!(count(&pixels, PALETTE[0]), 0, "nothing plottable");
        let (_, _, unmarked) = write(&[series("huge", &huge)], &[]);
        assert_eq!(pixels, unmarked, "marker skipped");
        assert!(count(&pixels, NOTE_COLOUR) > 20, "no-data note drawn");
        let mixed = [(0.0, 1.0), (1.0, f64::MAX), (2.0, 2.0), (3.0, 3.0)];
        let (_, _, pixels) = write(&[series("mixed", &mixed)], &[]);
        assert!(count(&pixels, PALETTE[0]) > 200, "the plottable run drawn");
        write(&[series("tiny", &[(0.0, 1e-300), (1.0, 2e-300)])], &[]);
        write(&[series("subnormal", &[(0.0, 5e-324), (1.0, 5e-324)])], &[]);
        write(&[series("edges", &[(-LIMIT, -LIMIT), (LIMIT, LIMIT)])], &[]);
    }

    #[test]
    fn gaps_split_lines_and_are_left_out_of_the_ranges() {
        let points = [
            (0.0, 1.0),
            (1.0, f64::NAN),
            (2.0, 3.0),
            (3.0, 4.0),
            (f64::INFINITY, 9.0),
            (4.0, 1e301),
        ];
        let runs: Vec<_> = plottable_runs(&points).collect();
        assert_eq!(runs, [&points[0..1], &points[2..4]]);
        let (x, y, has_data) = axis_ranges(&[series("s", &points)], &[]);
        assert!(has_data);
        // x 0..3 and y 1..4 (span 3), each padded by 0.15.
        assert!(
            (x.start + 0.15).abs() < 1e-12 && (x.end - 3.15).abs() < 1e-12,
            "{x:?}"
        );
        assert!(
            (y.start - 0.85).abs() < 1e-12 && (y.end - 4.15).abs() < 1e-12,
            "{y:?}"
        );
    }

    #[test]
    fn ranges_cover_markers_and_survive_degenerate_data() {
        let (x, _, _) = axis_ranges(
            &[series("s", &[(0.0, 1.0), (10.0, 2.0)])],
            &[Marker {
                x: 20.0,
                label: "late".to_string(),
            }],
        );
        assert!(x.start < 0.0 && x.end > 20.0, "{x:?}");
        let (_, flat, _) = axis_ranges(&[series("s", &[(0.0, 2.0), (1.0, 2.0)])], &[]);
        assert!(flat.start < 2.0 && flat.end > 2.0, "{flat:?}");
        let (x, y, has_data) = axis_ranges(&[series("s", &[])], &[]);
        assert_eq!((x, y, has_data), (0.0..1.0, 0.0..1.0, false));
        for values in [
            (LIMIT, LIMIT),
            (-LIMIT, LIMIT),
            (0.0, 0.0),
            (1e-300, 1e-300),
            (5e-324, 5e-324),
        ] {
            let r = padded(values);
            assert!(
                r.start.is_finite() && r.end.is_finite() && r.start < r.end,
                "{values:?} -> {r:?}"
            );
        }
    }

    #[test]
    fn legend_goes_where_it_hides_least() {
        let corner = |series: &[Series], markers: &[Marker]| {
            let chart = Chart {
                title: "t",
                x_label: "x",
                y_label: "y",
                series,
                markers,
            };
            let (x, y, _) = axis_ranges(series, markers);
            legend_corner(&chart, (&x, &y), (800, 400))
        };
        let rising: Vec<_> = (0..100).map(|i| (i as f64, i as f64)).collect();
        let falling: Vec<_> = (0..100).map(|i| (i as f64, -i as f64)).collect();
        let two = |points: &[(f64, f64)]| [series("a", points), series("b", points)];
        // The diagonal crosses the upper right and lower left corners.
        assert_eq!(corner(&two(&rising), &[]), SeriesLabelPosition::UpperLeft);
        assert_eq!(corner(&two(&falling), &[]), SeriesLabelPosition::UpperRight);
        // A marker label at the top right moves it off the top right.
        let late = [Marker {
            x: 99.0,
            label: "stage 3".to_string(),
        }];
        assert_eq!(
            corner(&two(&falling), &late),
            SeriesLabelPosition::LowerLeft
        );
        // Nothing to hide: the upper right.
        assert_eq!(corner(&two(&[]), &[]), SeriesLabelPosition::UpperRight);
    }

    #[test]
    fn errors_name_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("missing").join("chart.png");
        let chart = Chart {
            title: "t",
            x_label: "x",
            y_label: "y",
            series: &[],
            markers: &[],
        };
        let err = write_png(&path, &chart).expect_err("no such directory");
        assert!(
            format!("{err:#}").contains(&path.display().to_string()),
            "{err:#}"
        );
    }
}
