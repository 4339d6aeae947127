//! Correlation coefficients for ceilings and reward-model evaluation:
//! Pearson's r, and Spearman's rho as Pearson's r of average ranks (so ties
//! are handled the standard way).

/// Pearson correlation of `x` and `y`; `None` when the lengths differ, there
/// are fewer than two points, or either side is constant.
pub fn pearson(x: &[f64], y: &[f64]) -> Option<f64> {
    if x.len() != y.len() || x.len() < 2 {
        return None;
    }
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
        syy += (b - my) * (b - my);
    }
    if sxx == 0.0 || syy == 0.0 {
        return None;
    }
    Some(sxy / (sxx * syy).sqrt())
}

/// Spearman rank correlation of `x` and `y`: Pearson's r of their ranks,
/// tied values sharing the average of their ranks. `None` as for [`pearson`].
pub fn spearman(x: &[f64], y: &[f64]) -> Option<f64> {
    if x.len() != y.len() {
        return None;
    }
    pearson(&ranks(x), &ranks(y))
}

/// 1-based ranks, ties given the mean of the ranks they span.
/// NaNs sort after every number.
pub fn ranks(x: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let mut ranks = vec![0.0; x.len()];
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && x[order[end]] == x[order[start]] {
            end += 1;
        }
        // Positions start..end hold equal values: ranks start+1 ..= end.
        let rank = (start + 1 + end) as f64 / 2.0;
        for &i in &order[start..end] {
            ranks[i] = rank;
        }
        start = end;
    }
    ranks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() < 1e-12)
    }

    #[test]
    fn ranks_average_ties() {
        assert_eq!(ranks(&[10.0, 20.0, 20.0, 5.0]), vec![2.0, 3.5, 3.5, 1.0]);
        assert_eq!(ranks(&[1.0, 1.0, 1.0]), vec![2.0, 2.0, 2.0]);
        assert!(ranks(&[]).is_empty());
    }

    #[test]
    fn pearson_matches_hand_computation() {
        // x = 1,2,3,4; y = 2,4,5,9: means 2.5, 5; dx = -1.5,-.5,.5,1.5;
        // dy = -3,-1,0,4; sxy = 4.5+.5+0+6 = 11; sxx = 5; syy = 26.
        let r = pearson(&[1.0, 2.0, 3.0, 4.0], &[2.0, 4.0, 5.0, 9.0]);
        assert!(close(r, 11.0 / (5.0f64 * 26.0).sqrt()));
        assert!(close(pearson(&[1.0, 2.0, 3.0], &[6.0, 4.0, 2.0]), -1.0));
        assert_eq!(pearson(&[1.0, 1.0], &[1.0, 2.0]), None);
        assert_eq!(pearson(&[1.0], &[1.0]), None);
        assert_eq!(pearson(&[1.0, 2.0], &[1.0]), None);
    }

    #[test]
    fn spearman_matches_hand_computation() {
        // Without ties rho = 1 - 6 sum d^2 / (n (n^2 - 1)).
        // x ranks 1..5; y = 5,6,7,8,7.5 ranks 1,2,3,5,4: d^2 sum = 2;
        // rho = 1 - 12 / 120 = 0.9.
        let x = [1.0, 2.0, 3.0, 4.0, 5.0];
        let y = [5.0, 6.0, 7.0, 8.0, 7.5];
        assert!(close(spearman(&x, &y), 0.9));
        // Monotone but non-linear: rho 1 where r < 1.
        let cubes: Vec<f64> = x.iter().map(|v| v * v * v).collect();
        assert!(close(spearman(&x, &cubes), 1.0));
        assert!(pearson(&x, &cubes).unwrap() < 0.99);
        // With ties: x = 1,2,2,3 -> ranks 1,2.5,2.5,4; y = 1,3,2,4 -> 1,3,2,4.
        // Means 2.5; dx = -1.5,0,0,1.5; dy = -1.5,.5,-.5,1.5;
        // sxy = 2.25+2.25 = 4.5; sxx = 4.5; syy = 5: rho = 4.5 / sqrt(22.5).
        let rho = spearman(&[1.0, 2.0, 2.0, 3.0], &[1.0, 3.0, 2.0, 4.0]);
        assert!(close(rho, 4.5 / 22.5f64.sqrt()));
    }
}
